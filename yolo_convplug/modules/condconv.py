"""CondConv: Conditionally Parameterized Convolutions (Yang et al., NeurIPS 2019, arXiv:1904.04971), and the
per-sample-kernel convolution it shares with ODConv (:class:`DynamicKernelConv`)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights
from ultralytics.nn.modules.conv import autopad

from ..registry import ConversionError, register
from ._utils import check_conv_args, require_int, require_number, resolve_act


def per_sample_conv_macs(m, x, y):
    """thop rule of a :class:`DynamicKernelConv`: the per-sample convolution. Computing the kernels (bank size x
    kernel size per sample, independent of the image size) is left out: Ultralytics 8.3 counts at a stride-sized
    input and scales by resolution, which would inflate a size-independent term hundreds of times."""
    m.total_ops += y.numel() * (m.weight.shape[1] // m.c2)


class DynamicKernelConv(nn.Module):
    """Convolution whose kernel is computed per sample from a bank of ``n`` kernels, then BatchNorm and activation.

    A subclass defines ``kernels(x)``: every sample's kernel ``K_b``, flattened to shape (B, c2·c1/g·k·k). This base
    holds the bank ``weight`` (n, c2·c1/g·k·k), each row initialised like an ``nn.Conv2d`` kernel (c2, c1/g, k, k),
    and computes::

        y = act(BN(conv(x_b, K_b, stride=s, padding=autopad(k, p, d), dilation=d, groups=g)))   for every sample b

    The whole batch runs as one grouped convolution: the batch is folded into the channel axis,
    ``x -> (1, B·c1, H, W)``, the ``B`` per-sample kernels are stacked to ``(B·c2, c1/g, k, k)`` and
    ``groups = B·g``. No Python loop over samples. Folding bakes the batch size into the graph (the ``groups``
    attribute), so while tracing (``torch.jit.trace``, ``torch.onnx.export``) the same product is computed as
    im2col + batched matmul, ``K_b @ unfold(x_b)``, whose graph has no batch-dependent constant: exported models run
    at any batch size.

    ``fuse()`` folds BN into every kernel of the bank: with ``a = gamma / sqrt(var + eps)`` per output channel,
    ``BN(conv(x, K)) = conv(x, a ⊙ K) + (beta - a·mu)``, and ``a ⊙ K`` is the kernel computed from the bank
    ``a ⊙ W_i`` whenever ``K`` is built from the ``W_i`` by sums and elementwise per-sample factors (as in CondConv
    and ODConv).
    """

    def __init__(self, c1, c2, k, s, p, g, d, n, n_name):
        """Check the arguments and build the bank of ``n`` kernels (``n_name`` names it in errors); a subclass
        builds what computes ``kernels(x)``, then ``self.bn`` (BatchNorm2d(c2)) and ``self.act``."""
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

    def kernels(self, x):
        """Every sample's kernel, flattened: (B, c2·c1/g·k·k)."""
        raise NotImplementedError

    def dynamic_conv(self, x, bias=None):
        """Convolve every sample with its own kernel ``kernels(x)[b]`` (plus an optional per-channel bias)."""
        b, _, h, w = x.shape
        kernels = self.kernels(x)
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
        conv, bn = stock.conv, getattr(stock, "bn", None)
        if bn is None:
            raise ConversionError(f"the {type(stock).__name__} is fused (no BN to copy); convert before fusing")
        pairs = (("c1", self.c1, conv.in_channels), ("c2", self.c2, conv.out_channels),
                 ("k", (self.k,) * 2, conv.kernel_size), ("s", (self.s,) * 2, conv.stride),
                 ("p", (self.p,) * 2, conv.padding), ("g", self.g, conv.groups), ("d", (self.d,) * 2, conv.dilation))
        for arg, mine, theirs in pairs:
            if mine != theirs:
                raise ConversionError(f"{arg}: {type(stock).__name__} has {theirs}, {name} has {mine}")
        if type(stock.act) is not type(self.act):
            raise ConversionError(f"activation: {type(stock.act).__name__} in the stock layer, "
                                  f"{type(self.act).__name__} here")
        w = conv.weight.detach().reshape(1, -1)
        self.weight.copy_(w + noise * w.std() * torch.randn_like(self.weight))
        self.bn.load_state_dict(bn.state_dict())
        self.bn.eps, self.bn.momentum = bn.eps, bn.momentum
        n = self.weight.shape[0]
        return f"{n} {label} = W + {noise * 100:g}% noise" if noise else f"{n} {label} = W"


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
        self.bn = nn.BatchNorm2d(c2)
        self.act = resolve_act(act)

    def routing_weights(self, x):
        """Per-sample expert weights ``sigmoid(R · dropout(GAP(x)) + b_R)``, shape (B, experts)."""
        return torch.sigmoid(self.routing(self.dropout(x.mean((2, 3)))))

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
