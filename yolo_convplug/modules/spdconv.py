"""SPD-Conv: space-to-depth followed by a non-strided convolution, in place of a strided convolution.

Sunkara, Luo, "No More Strided Convolutions or Pooling: A New CNN Building Block for Low-Resolution Images and Small
Objects", ECML PKDD 2022, arXiv:2208.03641.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from ultralytics.nn.modules.conv import autopad

from ..registry import ConversionError, register
from ._stock import copy_bn, stock_conv_bn
from ._utils import check_conv_args, fuse_own_bn, require, resolve_act


def _spdconv_macs(m, x, y):
    """thop rule: the stride-1 ``k x k`` convolution over the ``s * s * c1`` space-to-depth channels per output value
    (the forward runs it as one ``F.conv2d`` call, which thop does not see)."""
    m.total_ops += y.numel() * m.conv.weight[0].numel()


@register(role="conv", macs=_spdconv_macs, paper="SPD-Conv, Sunkara, Luo, ECML PKDD 2022")
class SPDConv(nn.Module):
    """Space-to-depth (scale ``s``) then a stride-1 ``k x k`` convolution, BatchNorm and activation.

    ``SPD(x)`` moves each ``s x s`` block of pixels into channels: channel ``c * s * s + a * s + b`` of ``SPD(x)`` at
    ``(i, j)`` is ``x[c, s * i + a, s * j + b]`` (the map is zero-padded at the bottom/right to a multiple of ``s``).
    Then ``y = act(BN(conv_kxk(SPD(x))))`` with "same" padding ``k // 2`` and ``groups = g``; the output has
    ``ceil(H / s) x ceil(W / s)`` pixels, as a stride-``s`` ``Conv(c1, c2, k, s)`` gives. Nothing is discarded, unlike
    a strided convolution, which is the paper's point for small objects and low resolution. The paper uses scale 2
    (the YAMLs' ``s=2``); ``s=1`` is a plain ``Conv`` (``SPD`` is the identity), any ``s >= 1`` works.

    The forward computes the same values as one strided convolution: ``conv_kxk(SPD(x))`` is a stride-``s``
    convolution of ``x`` with the ``(s k) x (s k)`` kernel ``K[o, c, s t + a, s u + b] = W[o, c s s + a s + b, t, u]``
    and padding ``s (k // 2)`` top/left, ``s (k // 2) + s - 1`` bottom/right (the SPD's zero fill). That form needs
    no size-dependent padding or reshape of the activations, so it traces and exports for any map size; the
    parameters are the paper's ``conv_kxk`` weights (``self.conv``, ``4 c1`` input channels at ``s=2``).

    Conversely a stride-``s`` ``Conv(c1, c2, k', s)`` with "same" padding is exactly an SPD-Conv whose kernel holds
    the stock taps rearranged (zero where the SPD kernel covers no stock tap): ``convert_from`` is exact.
    """

    conversion_error = 1e-5

    def __init__(self, c1, c2, k=3, s=2, p=None, g=1, d=1, act=True):
        """Build the layer; see the class docstring. ``k`` odd, ``p`` "same" and ``d = 1`` (dilation on the
        space-to-depth map is not part of SPD-Conv)."""
        super().__init__()
        name = type(self).__name__
        check_conv_args(name, c1, c2, k, s, p, g, d)
        require(k % 2 == 1, name, "k", k, "SPDConv needs an odd kernel size (1, 3, 5, ...) for its 'same' padding")
        require(p is None or p == k // 2, name, "p", p, f"leave p=None ('same' padding {k // 2})")
        require(d == 1, name, "d", d, "SPDConv has no dilation: use d=1 (or a dilated Conv)")
        self.scale = s
        self.conv = nn.Conv2d(c1 * s * s, c2, k, 1, autopad(k), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = resolve_act(act)

    def strided_kernel(self, weight: torch.Tensor) -> torch.Tensor:
        """The ``(s k) x (s k)`` stride-``s`` kernel that equals ``weight`` applied to the space-to-depth map."""
        s, (c2, cin, k, _) = self.scale, weight.shape
        w = weight.view(c2, cin // (s * s), s, s, k, k)  # (o, c, a, b, t, u)
        return w.permute(0, 1, 4, 2, 5, 3).reshape(c2, cin // (s * s), s * k, s * k)  # (o, c, t a, u b)

    def _spd_conv(self, x, weight, bias=None):
        s, p = self.scale, self.conv.padding[0]
        x = F.pad(x, (s * p, s * p + s - 1) * 2)
        return F.conv2d(x, self.strided_kernel(weight), bias, s, 0, 1, self.conv.groups)

    def forward(self, x):
        """Space-to-depth, stride-1 convolution, BatchNorm and activation."""
        return self.act(self.bn(self._spd_conv(x, self.conv.weight)))

    def forward_fuse(self, x):
        """Fused inference: BN folded into the convolution."""
        return self.act(self._spd_conv(x, self.conv.weight, self.conv.bias))

    def fuse(self):
        """Fold BN into the convolution (exact in eval) and switch ``forward`` to ``forward_fuse``."""
        return fuse_own_bn(self)

    @torch.no_grad()
    def convert_from(self, stock: nn.Module) -> str:
        """Warm start from an Ultralytics ``Conv(c1, c2, k', s)`` with "same" padding: exactly its function.

        Stock tap ``u`` (dilation ``d'``, padding ``p'``) reads ``x[s i + d' u - p']``; with ``d' u - p' = s j + a``
        (``0 <= a < s``) that is SPD channel phase ``a`` at offset ``j``, i.e. SPD kernel tap ``j + k // 2``, which
        lies inside the ``k x k`` SPD kernel for the stock's own ``k`` (and dilations up to ``s``); BN is copied.
        Raises ``ConversionError`` naming the mismatch for another geometry (``c1``, ``c2``, ``k``, ``s``, ``g``, a
        padding other than "same", a dilation whose taps leave the SPD kernel), another activation or for a fused
        ``Conv``.
        """
        s, own = self.scale, self.conv
        k = own.kernel_size[0]
        dilation = getattr(getattr(stock, "conv", None), "dilation", (1, 1))  # any: the tap placement decides
        geometry = nn.Conv2d(own.in_channels // (s * s), own.out_channels, k, s, [d * (k - 1) // 2 for d in dilation],
                             dilation, own.groups, bias=False, device="meta")
        conv, bn = stock_conv_bn(f"SPDConv(s={s})", stock, geometry, self.act)
        (kh, kw), (dh, dw), (ph, pw) = conv.kernel_size, conv.dilation, conv.padding
        rows, cols = self._tap_places(kh, dh, ph), self._tap_places(kw, dw, pw)
        if rows is None or cols is None:
            raise ConversionError(f"stock kernel {conv.kernel_size} (dilation {conv.dilation}) reaches beyond the "
                                  f"{own.kernel_size} SPD kernel at scale {s}")
        weight = torch.zeros_like(own.weight).view(own.out_channels, -1, s, s, *own.kernel_size)  # (o, c, a, b, t, u)
        for u, (a, t) in enumerate(rows):
            for v, (b, w) in enumerate(cols):
                weight[:, :, a, b, t, w] = conv.weight[:, :, u, v]
        own.weight.copy_(weight.view_as(own.weight))
        copy_bn(self.bn, bn)
        return "exact: the stock kernel's taps rearranged into the space-to-depth kernel (zeros elsewhere), BN copied"

    def _tap_places(self, k: int, d: int, p: int) -> list[tuple[int, int]] | None:
        """(phase, SPD tap) of each stock tap along one axis, or None where one falls outside the SPD kernel."""
        s, half, size = self.scale, self.conv.padding[0], self.conv.kernel_size[0]
        places = [((d * u - p) % s, (d * u - p) // s + half) for u in range(k)]
        return places if all(0 <= t < size for _, t in places) else None
