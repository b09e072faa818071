"""ScConv: Spatial and Channel Reconstruction Convolution.

Jiafeng Li, Ying Wen, Lianghua He, "SCConv: Spatial and Channel Reconstruction Convolution for Feature Redundancy",
CVPR 2023. The authors published no code; github.com/cheng-haha/ScConv, the implementation most YOLO forks copy,
calls itself unofficial.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from ultralytics.nn.modules.conv import autopad

from ..registry import ConversionError, register
from ._utils import check_conv_args, require, require_int, require_number, resolve_act, spatial_mean


class GroupNorm4d(nn.GroupNorm):
    """``nn.GroupNorm`` whose affine ``weight`` and ``bias`` are stored as (1, C, 1, 1), the broadcast shape of an
    NCHW map, instead of (C,); same computation, and (C,) state dicts still load."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        """Build the GroupNorm, then reshape its affine parameters."""
        super().__init__(num_groups, num_channels, eps)
        self.weight = nn.Parameter(self.weight.detach().view(1, -1, 1, 1))
        self.bias = nn.Parameter(self.bias.detach().view(1, -1, 1, 1))

    def forward(self, x):
        """Group-normalise ``x`` and apply the affine."""
        return F.group_norm(x, self.num_groups, self.weight.flatten(), self.bias.flatten(), self.eps)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Reshape (C,) affine tensors of older state dicts, then load."""
        for name in ("weight", "bias"):
            t = state_dict.get(prefix + name)
            if t is not None and t.dim() == 1:
                state_dict[prefix + name] = t.view(1, -1, 1, 1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (1 when only 1 qualifies)."""
    return max(q for q in range(1, min(n, limit) + 1) if n % q == 0)


def _upper_width(alpha: float, c: int) -> int:
    """``round(alpha * c)`` (half up), clamped to [1, c - 1]: the upper part of a ``c``-channel split."""
    return min(max(math.floor(alpha * c + 0.5), 1), c - 1)


def _squeezed_widths(alpha: float, squeeze: int, m: int, c2: int) -> tuple[int, int]:
    """Squeezed widths ``(su, sl)`` of the upper and lower paths for ``m = min(c1, c2)`` (see the class docstring)."""
    mu = _upper_width(alpha, m)
    return max(mu // squeeze, 1), min(max((m - mu) // squeeze, 1), c2 - 1)


@register(role="conv", paper="SCConv, Li, Wen, He, CVPR 2023")
class ScConv(nn.Module):
    """SCConv = SRU then CRU, then BN and activation; a drop-in for Ultralytics ``Conv(c1, c2, k, s)``.

    Spatial Reconstruction Unit (SRU, paper Sec. 2.1, Eq. 1-4) on the ``c1`` input channels, with ``GN`` a
    GroupNorm of affine ``gamma, beta``::

        w  = |gamma| / sum|gamma|                        # paper: gamma / sum(gamma); equal while gamma > 0 (init 1),
                                                         # but never a division by ~0 when gamma sums near zero
        W  = sigmoid(w ⊙ GN(X))
        W1 = where(W >= t, 1, W),  W2 = where(W >= t, 0, W)        # informative / non-informative weights
        X1 = W1 ⊙ X,  X2 = W2 ⊙ X
        Xw = [X1_a + X2_b, X1_b + X2_a]                  # cross reconstruction of the halves a (first ceil(c1/2)
                                                         # channels) and b (last floor(c1/2)), i.e. X1 + rotate(X2)

    Channel Reconstruction Unit (CRU, Sec. 2.2, Eq. 5-9): split ``Xw`` into ``up = round(alpha·c1)`` upper and
    ``c1 - up`` lower channels (round half up, clamped to [1, c1 - 1]), squeeze each with a 1x1 conv (ratio
    ``squeeze``), then::

        Y1 = GWC_kxk(Xu) + PWC1(Xu)                      # group-wise kxk conv + point-wise conv, c2 channels
        Y2 = [PWC2(Xl), Xl]                              # point-wise conv plus the reused squeezed features
        b1 = exp(S1) / (exp(S1) + exp(S2)),  b2 = 1 - b1 # S = GAP(Y): channel-wise soft attention of the pair
        Y  = b1 ⊙ Y1 + b2 ⊙ Y2

    and the module returns ``act(BN(Y))``. ``b1, b2`` follow the paper's Eq. 8 (a softmax over the two branches,
    per channel, b1 + b2 = 1); the unofficial code instead softmaxes across all 2·c2 channels at once.

    Defaults follow the paper (t = 0.5, alpha = 1/2, r = 2, g = 2; GroupNorm groups, which it does not give, at most
    16 as the unofficial code). Beyond the paper's ``c1 = c2, s = 1`` the CRU maps c1 to c2 with stride s as
    ``Conv(c1, c2, k, s)`` does: the GWC carries ``k, s, p, d``, the point-wise paths sample the window centres at
    stride s, the squeezed widths come from ``min(c1, c2)`` and the group counts adapt to the widths. A layer whose kxk
    GWC would see a single squeezed channel (``min(c1, c2) < 7``, e.g. layer 0 on RGB) is refused. ``fuse()`` changes
    nothing (BN follows the input-dependent mix and cannot enter a kernel) and ``convert_from`` raises
    ``ConversionError`` (no tensor corresponds to a dense kernel): the warm start calibrates the layer instead.
    ``docs/modules.md`` gives the sources of the defaults and the reasons for each of these choices.

    Args:
        c1 (int): Input channels (>= 2).
        c2 (int): Output channels (>= 2).
        k (int): Kernel size of the group-wise conv.
        s (int): Stride.
        p (int | None): Padding of the kxk conv, ``autopad(k, p, d)`` when None.
        g (int): Must be 1: the grouping of the kxk conv is ``group_size``.
        d (int): Dilation of the kxk conv.
        act (bool | nn.Module): Activation, Ultralytics convention.
        alpha (float): Fraction of channels in the upper (kxk) part, in (0, 1).
        squeeze (int): Squeeze ratio r of the 1x1 squeeze convs.
        group_size (int): Groups of the kxk group-wise conv (upper bound, see above).
        gate_threshold (float): SRU gate threshold t, in (0, 1).
        gn_groups (int | None): GroupNorm groups (must divide c1, >= 2 channels each); None picks the largest
            divisor of c1 up to min(16, c1 // 2).
    """

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, d=1, act=True, alpha=0.5, squeeze=2, group_size=2,
                 gate_threshold=0.5, gn_groups=None):
        """Build the SRU GroupNorm, the CRU convolutions, BN and the activation."""
        super().__init__()
        name = type(self).__name__
        check_conv_args(name, c1, c2, k, s, p, g, d, min_channels=2)
        require(g == 1, name, "g", g, "use g=1; the grouping of ScConv's kxk conv is set by group_size")
        require_int(name, "squeeze", squeeze)
        require_int(name, "group_size", group_size)
        require_number(name, "alpha", alpha, 0, 1, "use a fraction in (0, 1)", low_open=True, high_open=True)
        require_number(name, "gate_threshold", gate_threshold, 0, 1, "use a value in (0, 1)", low_open=True,
                       high_open=True)
        if gn_groups is None:
            gn_groups = largest_divisor(c1, min(16, c1 // 2))
        require_int(name, "gn_groups", gn_groups)
        require(
            c1 % gn_groups == 0 and c1 // gn_groups >= 2,
            name,
            "gn_groups",
            gn_groups,
            f"it must divide c1={c1} leaving >= 2 channels per group, so 1x1 maps (P5 at imgsz 32) still normalise; "
            "or pass None",
        )

        self.gn = GroupNorm4d(gn_groups, c1)  # first: see the class docstring
        self.threshold = gate_threshold
        self.c1, self.half = c1, c1 // 2  # SRU halves: a = c1 - half channels, b = half channels
        self.up = _upper_width(alpha, c1)
        m = min(c1, c2)
        su, sl = _squeezed_widths(alpha, squeeze, m, c2)
        if k > 1 and su < 2:
            need = next(w for w in itertools.count(m) if _squeezed_widths(alpha, squeeze, w, w)[0] >= 2)
            require(
                False,
                name,
                "c1" if c1 <= c2 else "c2",
                m,
                f"with min(c1, c2)={m} the {k}x{k} conv would see {su} squeezed channel (round(alpha*{m}) // squeeze)"
                f"; ScConv needs min(c1, c2) >= {need} at alpha={alpha}, squeeze={squeeze}: keep a stock Conv where a "
                "layer sees the RGB image (layer 0) or this few channels, or lower squeeze",
            )
        pad = autopad(k, p, d)
        span = d * (k - 1)  # the kxk window's centre sits span//2 after its start
        self.align = (pad - span // 2, pad - (span - span // 2))  # (before, after) padding of the point-wise paths
        self.squeeze1 = nn.Conv2d(self.up, su, 1, bias=False)
        self.squeeze2 = nn.Conv2d(c1 - self.up, sl, 1, s, bias=False)
        gw = largest_divisor(math.gcd(su, c2), group_size)
        self.gwc = nn.Conv2d(su, c2, k, s, pad, dilation=d, groups=gw, bias=False) if k > 1 else None
        self.pwc1 = nn.Conv2d(su, c2, 1, s, bias=False)
        self.pwc2 = nn.Conv2d(sl, c2 - sl, 1, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = resolve_act(act)

    def sru(self, x):
        """Spatial reconstruction: GN-gated split into informative/non-informative parts, crossed; (a, b) halves."""
        gamma, beta = self.gn.weight.flatten(), self.gn.bias.flatten()  # 1-D in modules pickled before GroupNorm4d
        w = gamma.abs() / gamma.abs().sum().clamp_min(1e-12)  # w ⊙ GN(x) with w folded into GN's affine
        z = F.group_norm(x, self.gn.num_groups, gamma * w, beta * w, self.gn.eps).sigmoid_()
        n = torch.rsub(z.detach(), self.threshold).ceil_()  # 1 where W < t (non-informative), else 0: exact
        nx = n.mul_(x)  # in place on intermediates: fewer fresh buffers (autograd saves what it needs)
        x2 = nx * z  # W2 ⊙ X, W2 = where(W >= t, 0, W)
        x1 = (x - nx).add_(x2)  # W1 ⊙ X, W1 = where(W >= t, 1, W) = 1 - n + W2
        a = self.c1 - self.half
        return x1[:, :a] + x2[:, self.half :], x1[:, a:] + x2[:, : self.half]

    def _pointwise_input(self, x):
        """Pad/crop so a stride-s 1x1 conv samples the kxk windows' centres (identity for odd k with autopad)."""
        before, after = self.align
        return x if before == after == 0 else F.pad(x, (before, after, before, after))

    def cru(self, xa, xb):
        """Channel reconstruction of the SRU halves: split alpha, squeeze, transform, fuse by soft attention."""
        upper, lower = xa, xb
        if self.up != self.c1 - self.half:  # alpha != 1/2: split the reconstructed features elsewhere
            xw = torch.cat((xa, xb), 1)
            upper, lower = xw[:, : self.up], xw[:, self.up :]
        u = self.squeeze1(upper)
        y1 = self.pwc1(self._pointwise_input(u))
        if self.gwc is not None:
            y1 += self.gwc(u)
        low = self.squeeze2(self._pointwise_input(lower))
        y2 = torch.cat((self.pwc2(low), low), 1)
        b1 = torch.sigmoid(spatial_mean(y1, True) - spatial_mean(y2, True))  # softmax of the pair
        return torch.lerp(y2, y1, b1)  # b1 ⊙ Y1 + (1 - b1) ⊙ Y2

    def forward(self, x):
        """Apply SRU, CRU, BN and the activation."""
        return self.act(self.bn(self.cru(*self.sru(x))))

    def fuse(self):
        """Keep BN (it follows an input-dependent mix, see the class docstring); nothing to fold, returns self."""
        return self

    def convert_from(self, stock):
        """No conversion from a stock layer exists (see the class docstring): always raises ``ConversionError``."""
        raise ConversionError(
            "SRU/CRU have no dense kxk kernel to take the stock one, and the stock BN statistics belong to that kernel"
        )
