"""Diverse Branch Block (Ding, Zhang, Han, Ding, "Diverse Branch Block: Building a Convolution as an Inception-like
Unit", CVPR 2021, arXiv:2103.13425)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from ultralytics.nn.modules.conv import autopad

from ..registry import register
from ._stock import copy_bn, stock_conv_bn
from ._utils import check_conv_args, require_centred_kernel, resolve_act


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """BN in eval as ``a * z + b`` per channel: ``(a, b)``."""
    a = bn.weight / (bn.running_var + bn.eps).sqrt()
    return a, bn.bias - bn.running_mean * a


def _bn_then_pad(bn: nn.BatchNorm2d, z: torch.Tensor, pad: int) -> torch.Tensor:
    """``bn(z)`` padded by ``pad`` pixels with the value BN gives a zero input (running statistics, no gradient).

    In eval this is ``bn(zero-pad(z))``: what precedes the padding is a bias-free conv, so the branch equals a conv
    of the zero-padded input, which is what makes the fusion exact at the borders.
    """
    if pad == 0:
        return bn(z)
    a, b = _bn_affine(bn)
    value = b.detach().view(1, -1, 1, 1)
    return F.pad(bn(z) - value, [pad] * 4) + value


@register(role="conv", paper="Diverse Branch Block, Ding, Zhang, Han, Ding, CVPR 2021")
class DiverseBranchBlock(nn.Module):
    """Diverse Branch Block: four training branches summed, then the activation; ``fuse()`` makes it one kxk Conv.

    With ``s`` the stride and ``P`` "same" padding (``k // 2``)::

        y = BN(conv_kxk(x))                                        # kxk        (``conv``, ``bn``: a Conv's names)
          + BN(conv_1x1(x))                                        # 1x1, stride s
          + BN(avgpool_kxk(BNpad(conv_1x1(x))))                    # 1x1 -> kxk average, stride s
          + BN(conv_kxk(BNpad(conv_1x1(x, W + I))))                # 1x1 (identity-based, c1 -> c1) -> kxk, stride s
        out = act(y)

    ``BNpad`` is BN followed by padding with the value BN gives a zero input (the reference's BNAndPadLayer): the
    branch then equals a convolution of the zero-padded input, so that every branch is a kxk convolution with a
    bias and their sum folds exactly into one (``fuse()``): BNs into their convs, the 1x1 kernel into the centre
    of a kxk one, the average pool into a kxk kernel of ``1/k²`` on its diagonal, and a 1x1 -> kxk sequence into
    the kxk kernel ``W_kxk · W_1x1`` with the 1x1's bias carried through the kxk sum. The fused module is a plain
    ``Conv`` (conv with bias, then act).

    A fresh module has every branch at its initial values (BN gammas 1, the identity-based 1x1 the identity), as the
    reference code. Warm start: ``convert_from(conv)`` puts the stock kernel and BN into the kxk branch and zeroes
    the last BN (gamma and beta) of the three others, so they add exactly zero; their gammas get gradient at once
    (the normalised branch output), and the rest of each branch once its gamma has moved.

    Args:
        c1 (int): Input channels.
        c2 (int): Output channels.
        k (int): Kernel size, odd.
        s (int): Stride.
        p (int | None): Padding: None or ``k // 2`` ("same"; the branches align only then).
        g (int): Groups: 1.
        d (int): Dilation: 1.
        act (bool | nn.Module): Activation, Ultralytics convention.
    """

    conversion_error = 1e-5  # exact: the kxk branch is the stock conv + BN, the others add zero

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, d=1, act=True):
        """Build the four branches and the activation."""
        super().__init__()
        name = type(self).__name__
        check_conv_args(name, c1, c2, k, s, p, g, d)
        require_centred_kernel(name, k, p, g, d, "grouped branches are not implemented",
                               "the average and 1x1 branches have no dilated form")  # fmt: skip
        self.k, self.s, self.pad = k, s, autopad(k, p, d)
        self.conv = nn.Conv2d(c1, c2, k, s, self.pad, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.conv_1x1 = nn.Conv2d(c1, c2, 1, s, 0, bias=False)
        self.bn_1x1 = nn.BatchNorm2d(c2)
        self.avg_conv = nn.Conv2d(c1, c2, 1, bias=False)
        self.avg_bn_pad = nn.BatchNorm2d(c2)
        self.avg_bn = nn.BatchNorm2d(c2)
        self.seq_1x1 = nn.Conv2d(c1, c1, 1, bias=False)  # identity-based: its kernel is weight + I
        nn.init.zeros_(self.seq_1x1.weight)
        self.register_buffer("seq_identity", torch.eye(c1).view(c1, c1, 1, 1), persistent=False)
        self.seq_bn_pad = nn.BatchNorm2d(c1)
        self.seq_conv = nn.Conv2d(c1, c2, k, s, 0, bias=False)
        self.seq_bn = nn.BatchNorm2d(c2)
        self.act = resolve_act(act)

    def branches(self, x):
        """The four branch outputs (kxk, 1x1, 1x1-avg, 1x1-kxk), each (B, c2, Ho, Wo)."""
        k, s, pad = self.k, self.s, self.pad
        avg = _bn_then_pad(self.avg_bn_pad, self.avg_conv(x), pad)
        seq = _bn_then_pad(self.seq_bn_pad, F.conv2d(x, self.seq_1x1.weight + self.seq_identity), pad)
        return (self.bn(self.conv(x)), self.bn_1x1(self.conv_1x1(x)),
                self.avg_bn(F.avg_pool2d(avg, k, s, 0)), self.seq_bn(self.seq_conv(seq)))

    def forward(self, x):
        """Sum the four branches, then the activation."""
        a, b, c, d = self.branches(x)
        return self.act(a + b + c + d)

    def forward_fuse(self, x):
        """The fused block: one kxk convolution with bias, then the activation."""
        return self.act(self.conv(x))

    @torch.no_grad()
    def fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kxk kernel (c2, c1, k, k) and bias (c2,) of the eval-mode block (BN running statistics)."""
        k, c = self.k, self.k // 2
        a, b = _bn_affine(self.bn)
        kernel, bias = self.conv.weight * a.view(-1, 1, 1, 1), b.clone()
        a, b = _bn_affine(self.bn_1x1)
        kernel[:, :, c, c] += self.conv_1x1.weight[:, :, 0, 0] * a.view(-1, 1)
        bias += b
        a1, b1 = _bn_affine(self.avg_bn_pad)  # 1x1 then BN: (a1 W, b1); the average spreads it over the k x k taps
        a2, b2 = _bn_affine(self.avg_bn)
        kernel += (a2 * a1).view(-1, 1, 1, 1) * self.avg_conv.weight / (k * k)
        bias += a2 * b1 + b2
        a1, b1 = _bn_affine(self.seq_bn_pad)
        first = (self.seq_1x1.weight + self.seq_identity)[:, :, 0, 0] * a1.view(-1, 1)  # (c1, c1)
        a2, b2 = _bn_affine(self.seq_bn)
        second = self.seq_conv.weight * a2.view(-1, 1, 1, 1)  # (c2, c1, k, k)
        kernel += torch.einsum("omuv,mi->oiuv", second, first)
        bias += b2 + torch.einsum("omuv,m->o", second, b1)
        return kernel, bias

    def fuse(self):
        """Fold the four branches into one kxk conv with bias (exact in eval); delete them; ``forward_fuse``."""
        if hasattr(self, "bn"):
            kernel, bias = self.fused_kernel()
            conv = nn.Conv2d(kernel.shape[1], kernel.shape[0], self.k, self.s, self.pad).to(kernel)
            conv.weight.data.copy_(kernel)
            conv.bias.data.copy_(bias)
            for name in ("bn", "conv_1x1", "bn_1x1", "avg_conv", "avg_bn_pad", "avg_bn", "seq_1x1", "seq_bn_pad",
                         "seq_conv", "seq_bn", "seq_identity"):
                delattr(self, name)
            self.conv = conv.requires_grad_(False)
            self.forward = self.forward_fuse
        return self

    @torch.no_grad()
    def convert_from(self, stock: nn.Module) -> str:
        """Warm start from an Ultralytics ``Conv`` of the same geometry and activation: the kxk branch takes its
        kernel and BN, the last BN of each other branch is zeroed (gamma and beta): exactly the stock function.

        Raises:
            ConversionError: a fused stock layer, or one of another geometry or activation.
        """
        conv, bn = stock_conv_bn(type(self).__name__, stock, self.conv, self.act)
        self.conv.weight.copy_(conv.weight)
        copy_bn(self.bn, bn)
        for last in (self.bn_1x1, self.avg_bn, self.seq_bn):
            last.weight.zero_()
            last.bias.zero_()
        return "exact: kxk branch = the stock conv + BN, the 1x1, 1x1-avg and 1x1-kxk branches start at zero"
