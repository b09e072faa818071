"""The per-sample-kernel convolution that CondConv and ODConv share: a bank of kernels mixed per sample, then
BatchNorm and activation."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights
from ultralytics.nn.modules.conv import autopad

from ._per_sample_conv import TrainableGroupedConv, grouped_conv, out_size, per_sample_conv
from ._stock import copy_bn, stock_conv_bn
from ._utils import check_conv_args, require_int, require_number, resolve_act


def per_sample_conv_macs(m, x, y):
    """thop rule of a :class:`DynamicKernelConv`: the per-sample convolution. Computing the kernels (bank size x
    kernel size per sample, independent of the image size) is left out: Ultralytics 8.3 counts at a stride-sized
    input and scales by resolution, which would inflate a size-independent term hundreds of times."""
    m.total_ops += y.numel() * (m.weight.shape[1] // m.c2)


class DynamicKernelConv(nn.Module):
    """Convolution whose kernel is computed per sample from a bank of ``n`` kernels, then BatchNorm and activation.

    A subclass defines ``kernels(x)``: every sample's kernel ``K_b``, flattened to shape (B, c2·c1/g·k·k); or, where
    part of the kernel's scaling is cheaper on the maps (ODConv), its own ``dynamic_conv`` around :meth:`convolve`.
    This base holds the bank ``weight`` (n, c2·c1/g·k·k), each row initialised like an ``nn.Conv2d`` kernel (c2,
    c1/g, k, k), and computes::

        y = act(BN(conv(x_b, K_b, stride=s, padding=autopad(k, p, d), dilation=d, groups=g)))   for every sample b

    The whole batch runs as one grouped convolution: the batch is folded into the channel axis,
    ``x -> (1, B·c1, H, W)``, the ``B`` per-sample kernels are stacked to ``(B·c2, c1/g, k, k)`` and
    ``groups = B·g``. No Python loop over samples in the forward; on CPU the backward runs one convolution backward
    per sample, which oneDNN computes faster than the grouped one (:mod:`._per_sample_conv`). Folding bakes the
    batch size into the graph (the ``groups`` attribute), so while tracing (``torch.jit.trace``, ``torch.onnx.export``)
    the same product is computed as im2col + batched matmul, ``K_b @ unfold(x_b)``, whose graph has no batch-dependent
    constant: exported models run at any batch size. Under ``torch.compile`` (whose inductor cannot lower ``groups = B``
    for a dynamic batch) the grouped convolution runs as one opaque operator (:mod:`._per_sample_conv`) with a
    symbolic batch.

    ``fuse()`` folds BN into every kernel of the bank: with ``a = gamma / sqrt(var + eps)`` per output channel,
    ``BN(conv(x, K)) = conv(x, a ⊙ K) + (beta - a·mu)``, and ``a ⊙ K`` is the kernel computed from the bank
    ``a ⊙ W_i`` whenever ``K`` is built from the ``W_i`` by sums and elementwise per-sample factors (as in CondConv
    and ODConv).
    """

    def __init__(self, c1, c2, k, s, p, g, d, n, n_name):
        """Check the arguments and build the bank of ``n`` kernels (``n_name`` names it in errors); a subclass
        then builds what computes ``kernels(x)`` and calls :meth:`build_output`."""
        super().__init__()
        name = type(self).__name__
        check_conv_args(name, c1, c2, k, s, p, g, d)
        require_int(name, n_name, n)
        self.c1, self.c2, self.k, self.s, self.g, self.d = c1, c2, k, s, g, d
        self.p = autopad(k, p, d)
        # one flattened kernel (c2, c1/g, k, k) per row: 2-D, so Ultralytics' channels_last conversion leaves it be
        self.weight = nn.Parameter(torch.empty(n, c2 * (c1 // g) * k * k))
        for i in range(n):  # every kernel initialised like an nn.Conv2d kernel
            nn.init.kaiming_uniform_(self.weight.data[i].view(c2, c1 // g, k, k), a=math.sqrt(5))

    def build_output(self, act):
        """Build the BatchNorm2d(c2) and the activation (Ultralytics convention) after the per-sample convolution.

        A subclass calls it last in its ``__init__``, after the layers that compute its kernels, so that the
        parameters keep their order: a resumed training run restores the optimizer state by position.
        """
        self.bn = nn.BatchNorm2d(self.c2)
        self.act = resolve_act(act)

    def kernels(self, x):
        """Every sample's kernel, flattened: (B, c2·c1/g·k·k)."""
        raise NotImplementedError

    def dynamic_conv(self, x, bias=None):
        """Convolve every sample with its own kernel ``kernels(x)[b]`` (plus an optional per-channel bias)."""
        return self.convolve(x, self.kernels(x), bias)

    def convolve(self, x, kernels, bias=None):
        """Convolve sample ``b`` of ``x`` with ``kernels[b]`` (flattened, (B, c2·c1/g·k·k)), plus ``bias``."""
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return self._unfold_conv(x, kernels, bias)
        kernels = kernels.reshape(len(x), self.c2, self.c1 // self.g, self.k, self.k)
        if torch.compiler.is_compiling():  # one opaque operator: inductor cannot lower groups = B for a dynamic B
            y = per_sample_conv(x, kernels, self.s, self.p, self.d, self.g)
            return y if bias is None else y + bias.reshape(1, -1, 1, 1)
        if bias is None:  # training (BN unfused)
            return TrainableGroupedConv.apply(x, kernels, self.s, self.p, self.d, self.g)
        return grouped_conv(x, kernels, self.s, self.p, self.d, self.g, bias)

    def _unfold_conv(self, x, kernels, bias):
        """Same product as im2col + batched matmul: a graph without batch-size constants (for tracing/export)."""
        b, _, h, w = x.shape
        ho, wo = (out_size(n, self.k, self.s, self.p, self.d) for n in (h, w))
        cols = F.unfold(x, self.k, self.d, self.p, self.s).reshape(b, self.g, -1, ho * wo)  # (B, g, c1/g·k·k, L)
        y = (kernels.reshape(b, self.g, self.c2 // self.g, -1) @ cols).reshape(b, self.c2, ho, wo)
        return y if bias is None else y + bias.reshape(1, -1, 1, 1)

    def forward(self, x):
        """Apply the per-sample convolution, BN and the activation."""
        return self.act(self.bn(self.dynamic_conv(x)))

    def forward_fuse(self, x):
        """Apply the per-sample convolution with BN folded into the bank, then the activation."""
        return self.act(self.dynamic_conv(x, self.bias))

    def fuse(self):
        """Fold BN into every kernel of the bank and a per-channel bias (exact), delete BN, switch to forward_fuse."""
        if not hasattr(self, "bn"):  # already fused
            return self
        bn = self.bn
        bank = self.weight.view(-1, self.c2, self.c1 // self.g, self.k, self.k).transpose(0, 1)
        w, b = fuse_conv_bn_weights(bank, None, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        self.weight = nn.Parameter(w.detach().transpose(0, 1).reshape_as(self.weight).contiguous(), requires_grad=False)
        self.bias = nn.Parameter(b.detach(), requires_grad=False)
        del self.bn
        self.forward = self.forward_fuse
        return self

    @torch.no_grad()
    def convert_bank(self, stock: nn.Module, noise: float, label: str) -> str:
        """Set every kernel of the bank to the stock ``Conv``'s kernel ``W`` plus Gaussian noise of ``noise`` x
        std(W), and BN to the stock BN; return e.g. ``"8 experts = W + 1% noise"`` (``label`` names the kernels).

        Raises:
            ConversionError: the stock layer is fused, or differs in shape, stride, padding, groups, dilation or
                activation.
        """
        name = type(self).__name__
        require_number(name, "noise", noise, 0, float("inf"),
                       "use a fraction of the kernel's std >= 0 (0: exact copies)")
        geometry = nn.Conv2d(self.c1, self.c2, self.k, self.s, self.p, self.d, self.g, False, device="meta")
        conv, bn = stock_conv_bn(name, stock, geometry, self.act)
        w = conv.weight.detach().reshape(1, -1)
        self.weight.copy_(w + noise * w.std() * torch.randn_like(self.weight))
        copy_bn(self.bn, bn)
        n = self.weight.shape[0]
        return f"{n} {label} = W + {noise * 100:g}% noise" if noise else f"{n} {label} = W"
