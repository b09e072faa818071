"""SPConv: split the input into representative and redundant channels, rich convolution on the first, a cheap one on
the rest, and a parameter-free fusion of the two.

Zhang, Zhou, Jiang, Chen, Zhou, Yang, Wang, "Split to Be Slim: An Overlooked Redundancy in Vanilla Convolution",
IJCAI 2020, arXiv:2006.12085.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from ultralytics.nn.modules.conv import autopad
from ultralytics.utils.torch_utils import fuse_conv_and_bn

from ..registry import register
from ._utils import check_conv_args, require, require_int, require_number, resolve_act, spatial_mean


def _fold_bn_into_sum(gwc: nn.Conv2d, pwc: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[nn.Conv2d, nn.Conv2d]:
    """``bn(gwc(x) + pwc(x'))`` as ``gwc'(x) + pwc'(x')``: both kernels scaled, BN's shift the bias of ``gwc'``."""
    gwc, pwc = fuse_conv_and_bn(gwc, bn), fuse_conv_and_bn(pwc, bn)
    pwc.bias = None  # the shift is in gwc's bias once
    return gwc, pwc


@register(role="conv", paper="Split to Be Slim (SPConv), Zhang, Zhou et al., IJCAI 2020")
class SPConv(nn.Module):
    """SPConv followed by BatchNorm and activation.

    With ``c = int(alpha * c1)`` representative channels ``x_r = x[:, :c]`` and the ``c1 - c`` redundant ones
    ``x_u = x[:, c:]`` (the paper's fixed split: the first channels), pooled by ``P = avgpool(s x s, stride s)``
    when ``s > 1``::

        R = BN_r(gwc_kxk(x_r) + pwc_1x1(P(x_r)))       # group-wise conv (stride s, ``groups`` groups) + point-wise
        U = BN_u(conv_1x1(P(x_u)))                      # cheap 1x1 on the pooled redundant channels
        [a, b] = softmax([GAP(R), GAP(U)])              # per channel and image: the parameter-free fusion
        out = act(BN(a * R + b * U))

    as the official code computes it (``SPConv_3x3``), for any ``c1 -> c2``, kernel size, stride and dilation;
    the official module has no BN after the fusion (its ResNet puts one there), ours is the ``Conv`` convention's.
    The pooling rounds up (``ceil_mode``, averaging the pixels inside the map), so odd maps give the
    ``ceil(H / s)`` pixels of the strided convolution. ``fuse()`` folds ``BN_r`` and ``BN_u`` into their convolutions
    (the fusion sees the same ``R`` and ``U``) and the final BN, which follows the data-dependent fusion, into a
    per-channel scale and shift.

    There is no conversion from a stock ``Conv``: the stock kernel has no counterpart in the split (the redundant
    channels only get a 1x1, the representative ones a grouped kernel), so a warm start leaves the layer to the
    calibrated start.
    """

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, d=1, act=True, alpha=0.5, groups=2):
        """Build the layer; see the class docstring. ``alpha`` in (0, 1) is the representative share of ``c1``,
        ``groups`` the group-wise convolution's groups (the paper's 2); ``g`` must stay 1 (use ``groups``)."""
        super().__init__()
        name = type(self).__name__
        check_conv_args(name, c1, c2, k, s, p, g, d, min_channels=2)
        require(k % 2 == 1, name, "k", k, "SPConv needs an odd kernel size (1, 3, 5, ...) so its branches align")
        require(p is None or p == autopad(k, None, d), name, "p", p, f"leave p=None ('same' padding "
                f"{autopad(k, None, d)}); the branches assume it")
        require(g == 1, name, "g", g, "SPConv splits the channels itself: leave g=1, set groups= instead")
        require_number(name, "alpha", alpha, 0, 1, "the representative share must be in (0, 1)", True, True)
        require_int(name, "groups", groups)
        rep = int(c1 * alpha)
        require(1 <= rep < c1 and rep % groups == 0, name, "alpha", alpha, f"int(alpha * c1) = {rep} representative "
                f"channels of c1={c1} must be in [1, c1) and divisible by groups={groups}")
        require(c2 % groups == 0, name, "c2", c2, f"it must be divisible by groups={groups}")
        self.representative, self.stride = rep, s
        self.gwc = nn.Conv2d(rep, c2, k, s, autopad(k, None, d), d, groups, bias=False)
        self.pwc = nn.Conv2d(rep, c2, 1, bias=False)
        self.rep_bn = nn.BatchNorm2d(c2)
        self.cheap = nn.Conv2d(c1 - rep, c2, 1, bias=False)
        self.red_bn = nn.BatchNorm2d(c2)
        self.bn = nn.BatchNorm2d(c2)
        self.act = resolve_act(act)

    def _pool(self, x):
        s = self.stride
        return x if s == 1 else F.avg_pool2d(x, s, s, ceil_mode=True)

    def _fused_branches(self, x):
        """``a * R + b * U`` (before the final BN); ``R``/``U`` without their BN once ``fuse()`` folded it."""
        x_r, x_u = x[:, : self.representative], x[:, self.representative :]
        r = self.gwc(x_r) + self.pwc(self._pool(x_r))
        u = self.cheap(self._pool(x_u))
        if hasattr(self, "rep_bn"):
            r, u = self.rep_bn(r), self.red_bn(u)
        weights = torch.stack((spatial_mean(r), spatial_mean(u))).softmax(0)[..., None, None]
        return weights[0] * r + weights[1] * u

    def forward(self, x):
        """Split, both branches, parameter-free fusion, BatchNorm and activation."""
        return self.act(self.bn(self._fused_branches(x)))

    def forward_fuse(self, x):
        """Fused inference: branch BNs folded, the final BN as a per-channel scale and shift."""
        return self.act(torch.addcmul(self.fused_shift, self._fused_branches(x), self.fused_scale))

    @torch.no_grad()
    def fuse(self):
        """Fold the two branch BNs into their convolutions and the final BN into a per-channel affine (exact in
        eval): the final BN follows the input-dependent fusion, so no convolution can absorb it."""
        if hasattr(self, "rep_bn"):
            self.gwc, self.pwc = _fold_bn_into_sum(self.gwc, self.pwc, self.rep_bn)
            self.cheap = fuse_conv_and_bn(self.cheap, self.red_bn)
            bn = self.bn
            scale = bn.weight / (bn.running_var + bn.eps).sqrt()
            self.register_buffer("fused_scale", scale.view(-1, 1, 1))
            self.register_buffer("fused_shift", (bn.bias - bn.running_mean * scale).view(-1, 1, 1))
            del self.rep_bn, self.red_bn, self.bn
            self.forward = self.forward_fuse
        return self
