"""CondConv: Conditionally Parameterized Convolutions (Yang et al., NeurIPS 2019, arXiv:1904.04971)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..registry import ConversionError, register
from ._utils import require_number, spatial_mean
from .dynamic import DynamicKernelConv, per_sample_conv_macs


@register(role="conv", macs=per_sample_conv_macs, paper="CondConv, Yang, Bender, Le, Ngiam, NeurIPS 2019")
class CondConv(DynamicKernelConv):
    """Conditionally parameterized convolution with BatchNorm and activation, Ultralytics ``Conv`` convention.

    For every sample ``x`` of the batch::

        r(x) = sigmoid(R · dropout(GAP(x)) + b_R)          # (experts,) routing weights, one set per sample
        W(x) = sum_i r_i(x) · W_i                          # per-sample kernel, W_i of shape (c2, c1/g, k, k)
        y    = act(BN(conv(x, W(x), stride=s, padding=autopad(k, p, d), dilation=d, groups=g)))

    Because convolution is linear in the kernel this equals the mixture of ``experts`` convolutions at the cost of a
    single one, computed for the whole batch at once by :class:`DynamicKernelConv` (one grouped convolution; im2col
    + batched matmul under tracing and export). In eval a sample's output does not depend on the rest of the batch
    (routing is per sample, BN uses running statistics). ``fuse()`` folds BN into every expert (exact: the kernel
    mixture is linear).

    Warm start: ``convert_from(conv)`` sets every expert to the stock kernel plus small noise (identical experts
    would get identical gradients forever), the routing weight to 0 and its bias to ``logit(1/experts)`` so that
    ``sum_i r_i = 1``: the layer starts as the stock convolution, up to the noise, with the stock BN.

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
            routing noise makes the BN statistics of short schedules unstable; raise it for long schedules if
            routing overfits.
    """

    # convert_from's 1% noise, averaged over the experts (>= 2): kernel error 1%/sqrt(experts) <= 0.71%
    conversion_error = 0.01

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, d=1, act=True, experts=8, dropout=0.0):
        """Build the expert kernels, the routing layer, BN and the activation."""
        super().__init__(c1, c2, k, s, p, g, d, experts, "experts")
        require_number(type(self).__name__, "dropout", dropout, 0, 1, "use a rate in [0, 1)", high_open=True)
        self.dropout = nn.Dropout(dropout)
        self.routing = nn.Linear(c1, experts)
        self.build_output(act)

    def routing_weights(self, x):
        """Per-sample expert weights ``sigmoid(R · dropout(GAP(x)) + b_R)``, shape (B, experts)."""
        return torch.sigmoid(self.routing(self.dropout(spatial_mean(x))))

    def kernels(self, x):
        """Every sample's kernel ``sum_i r_i(x) W_i``, flattened: (B, c2·c1/g·k·k)."""
        return self.routing_weights(x) @ self.weight

    @torch.no_grad()
    def convert_from(self, stock: nn.Module, noise: float = 0.01) -> str:
        """Start from a stock Ultralytics ``Conv``: experts ``W + noise · std(W) · N(0, 1)``, routing weight 0 and
        bias ``logit(1/experts)`` (so ``r_i = 1/experts``), BN copied; returns what it did.

        Raises:
            ConversionError: one expert (its routing weight cannot be exactly 1), or a stock layer of another shape.
        """
        experts = self.weight.shape[0]
        if experts == 1:
            raise ConversionError("experts=1: the routing weight sigmoid(b) cannot be exactly 1; use experts >= 2")
        description = self.convert_bank(stock, noise, "experts")
        self.routing.weight.zero_()
        self.routing.bias.fill_(-math.log(experts - 1))  # logit(1/E): E · sigmoid(b) = 1
        return description
