"""ODConv: Omni-Dimensional Dynamic Convolution (Li, Zhou, Yao, ICLR 2022, openreview.net/forum?id=DmpCfq6Mg39)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import register
from ._per_sample_conv import out_size
from ._utils import require, require_int, require_number, spatial_mean
from .dynamic import DynamicKernelConv, per_sample_conv_macs


@register(role="conv", macs=per_sample_conv_macs, paper="ODConv, Li, Zhou, Yao, ICLR 2022")
class ODConv(DynamicKernelConv):
    """Omni-dimensional dynamic convolution with BatchNorm and activation, Ultralytics ``Conv`` convention.

    For every sample ``x`` of the batch, with ``z = ReLU(BN(FC(GAP(x))))`` (FC: c1 -> max(int(c1·reduction), 16),
    no bias) and ``T`` the temperature::

        a_s = 2·sigmoid(FC_s(z) / T)                # (k, k)  spatial attention
        a_c = 2·sigmoid(FC_c(z) / T)                # (c1,)   input-channel attention
        a_f = 2·sigmoid(FC_f(z) / T)                # (c2,)   output-channel (filter) attention
        a_w = softmax(FC_w(z) / T)                  # (n,)    kernel attention
        W(x) = sum_i a_w_i · a_s ⊙ a_c ⊙ a_f ⊙ W_i  # W_i of shape (c2, c1/g, k, k), attentions broadcast over it
        y    = act(BN(conv(x, W(x), stride=s, padding=autopad(k, p, d), dilation=d, groups=g)))

    ``a_s``, ``a_c`` and ``a_f`` are shared by the ``n`` kernels, so ``W(x) = a_s ⊙ a_c ⊙ a_f ⊙ sum_i a_w_i W_i``:
    one mixture, scaled along the three other kernel dimensions, then the batched per-sample convolution of
    :class:`DynamicKernelConv` (one grouped convolution; im2col + batched matmul under tracing and export). Where
    a map is smaller than the kernels (many channels on a small map, strided layers' output) ``a_c`` scales the
    input map or ``a_f`` the output map instead, the same product in fewer multiplies (:meth:`placement`).

    The three sigmoid attentions are ``2·sigmoid``, not the paper's ``sigmoid``: 1 at zero logits, so a layer
    converted from a ``Conv`` (head weights and biases 0) computes exactly ``W``. Their product is 8 times the
    paper's, a constant that the BN after the convolution removes. As in the reference code, ``T`` divides all four
    logits, and an attention that means nothing is left out (taken as 1): the kernel attention with ``n = 1``
    (the paper's ODConv 1x), the spatial one for a 1x1 kernel, the filter one for a depth-wise conv (c1 = g = c2).
    In training with a batch of
    one, the attention's BN uses its running statistics (one sample has no batch statistics).

    ``fuse()`` folds the output BN into every kernel of the bank and a bias (exact: ``a_f``, like BN's scale, acts
    per output channel); the attention's BN stays, a (B, hidden) operation.

    Warm start: ``convert_from(conv)`` sets every kernel to the stock kernel plus small noise, the four head
    weights and biases to 0 (``a_s = a_c = a_f = 1``, ``a_w = 1/n``) and BN to the stock BN: the layer starts as
    the stock convolution, up to the noise.

    Args:
        c1 (int): Input channels.
        c2 (int): Output channels.
        k (int): Kernel size.
        s (int): Stride.
        p (int | None): Padding, ``autopad(k, p, d)`` when None.
        g (int): Groups; must divide c1 and c2.
        d (int): Dilation.
        act (bool | nn.Module): Activation, Ultralytics convention.
        kernel_num (int): Number of kernels ``n`` (the paper's 1x and 4x use 1 and 4).
        reduction (float): Width of the attention's hidden layer relative to c1, in (0, 1] (the paper uses 1/16),
            at least 16.
        temperature (float): Softmax/sigmoid temperature ``T`` > 0; with ``anneal_epochs`` its value at the start.
        anneal_epochs (int): 0 (default): ``T`` stays constant. ``E > 0``: the official schedule (from Dynamic
            Convolution), ``T`` falls linearly from ``temperature`` (30 there) to 1 over the first ``E`` epochs
            (10 there) of an Ultralytics training, ``T = 1 + (temperature - 1) · max(0, 1 - epoch / E)``, then
            stays 1. The epoch is a buffer saved with the weights (a trained model keeps its ``T``), set by
            ``set_train_epoch`` at every epoch's start by the package's ``on_train_epoch_start`` callback
            (``yolo_convplug.train_epoch``, in Ultralytics' default callbacks from start-up, ``yolo train`` too).
    """

    anneal_epochs = 0  # the default for modules pickled before the schedule existed

    # convert_from's 1% noise, averaged over the n >= 1 kernels: kernel error 1%/sqrt(n) <= 1%
    conversion_error = 0.015

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, d=1, act=True, kernel_num=4, reduction=0.0625,
                 temperature=1.0, anneal_epochs=0):
        """Build the kernels, the attention branch (shared FC, BN, ReLU and four heads), BN and the activation."""
        super().__init__(c1, c2, k, s, p, g, d, kernel_num, "kernel_num")
        name = type(self).__name__
        require_number(name, "reduction", reduction, 0, 1, "use a ratio in (0, 1], e.g. 0.0625", low_open=True)
        require_number(name, "temperature", temperature, 0, float("inf"), "use a number > 0, e.g. 1.0", low_open=True)
        require_int(name, "anneal_epochs", anneal_epochs, 0)
        require(not anneal_epochs or temperature >= 1, name, "temperature", temperature,
                "annealing goes down to 1: start at a temperature >= 1 (the official schedule starts at 30)")
        self.temperature, self.anneal_epochs = temperature, anneal_epochs
        if anneal_epochs:
            self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        hidden = max(int(c1 * reduction), 16)
        self.fc = nn.Linear(c1, hidden, bias=False)
        self.fc_bn = nn.BatchNorm1d(hidden)
        # as the reference code: no spatial head for a 1x1 kernel, no filter head for a depth-wise conv (a_s, a_f = 1)
        self.attn_spatial = nn.Linear(hidden, k * k) if k > 1 else None
        self.attn_in = nn.Linear(hidden, c1)
        self.attn_out = None if c1 == g == c2 else nn.Linear(hidden, c2)
        self.attn_kernel = nn.Linear(hidden, kernel_num) if kernel_num > 1 else None
        for fc in (self.fc, self.attn_spatial, self.attn_in, self.attn_out, self.attn_kernel):
            if fc is not None:  # as the reference code
                nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
                if fc.bias is not None:
                    nn.init.zeros_(fc.bias)
        self.build_output(act)

    def set_train_epoch(self, epoch: int) -> None:
        """Record the training epoch that starts (the annealing schedule's clock; no-op without annealing)."""
        if self.anneal_epochs:
            self.epoch.fill_(epoch)

    def current_temperature(self) -> float:
        """``T`` now: ``temperature``, or with ``anneal_epochs`` its linear decay to 1 at the current epoch."""
        if not self.anneal_epochs:
            return self.temperature
        remaining = max(0.0, 1 - int(self.epoch) / self.anneal_epochs)
        return 1 + (self.temperature - 1) * remaining

    def attentions(self, x):
        """Per-sample ``(a_s (B, k·k), a_c (B, c1), a_f (B, c2), a_w (B, n))``; a missing head's attention is
        None (``a_s`` at k = 1, ``a_f`` depth-wise, ``a_w`` at n = 1)."""
        z = self.fc(spatial_mean(x))
        if self.training and z.shape[0] == 1:  # one sample has no batch statistics: use the running ones
            bn = self.fc_bn
            z = F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            z = self.fc_bn(z)
        z = F.relu(z)
        t = self.current_temperature()
        a_s, a_c, a_f = (None if fc is None else 2 * torch.sigmoid(fc(z) / t)
                         for fc in (self.attn_spatial, self.attn_in, self.attn_out))
        a_w = None if self.attn_kernel is None else torch.softmax(self.attn_kernel(z) / t, 1)
        return a_s, a_c, a_f, a_w

    def scaled_kernels(self, a_s, a_c, a_f, a_w):
        """``sum_i a_w_i W_i`` scaled by those of ``a_s``, ``a_c``, ``a_f`` that are not None, flattened: (B or 1,
        c2·c1/g·k·k)."""
        g, c1g, c2g, kk = self.g, self.c1 // self.g, self.c2 // self.g, self.k * self.k
        bank = (self.weight if a_w is None else a_w @ self.weight).view(-1, g, c2g, c1g, kk)
        # kernel layout (c2, c1/g, k, k) = (g, c2/g, c1/g, k·k): output channel j·c2/g + o sees inputs j·c1/g + i
        scale = None
        for a, shape in ((a_c, (-1, g, 1, c1g, 1)), (a_f, (-1, g, c2g, 1, 1)), (a_s, (-1, 1, 1, 1, kk))):
            if a is not None:
                scale = a.view(shape) if scale is None else scale * a.view(shape)
        return (bank if scale is None else bank * scale).flatten(1)

    def placement(self, x) -> tuple[bool, bool]:
        """Whether ``a_c`` scales the input map and ``a_f`` the output map instead of every kernel: whichever costs
        fewer multiplies per sample, as ``conv(x, a_c ⊙ a_f ⊙ K) = a_f ⊙ conv(a_c ⊙ x, K)`` (``a_c`` scales the
        kernel's input channels, ``a_f`` its output channels). The attentions left on the kernel combine into one
        scale (the product of their sizes, when two or more) that multiplies every weight; one on a map costs one
        multiply per map element."""
        h, w = x.shape[2:]
        ho, wo = (out_size(n, self.k, self.s, self.p, self.d) for n in (h, w))
        spatial, filter_ = self.attn_spatial is not None, self.attn_out is not None

        def cost(c_on_map, f_on_map):
            sizes = [n for n, on in ((self.c1 // self.g, not c_on_map), (self.c2, filter_ and not f_on_map),
                                     (self.k**2, spatial)) if on]
            kernel = self.c2 * (self.c1 // self.g) * self.k**2 + (math.prod(sizes) if len(sizes) > 1 else 0)
            return kernel * bool(sizes) + c_on_map * self.c1 * h * w + f_on_map * self.c2 * ho * wo

        return min(((c, f) for c in (False, True) for f in (False, filter_)), key=lambda cf: cost(*cf))

    def dynamic_conv(self, x, bias=None):
        """The per-sample convolution with ``a_c`` and ``a_f`` on the kernels or the maps (:meth:`placement`)."""
        a_s, a_c, a_f, a_w = self.attentions(x)
        c_on_map, f_on_map = self.placement(x)
        kernels = self.scaled_kernels(a_s, None if c_on_map else a_c, None if f_on_map else a_f, a_w)
        if kernels.shape[0] == 1:  # 1x1, one kernel, both attentions on the maps: nothing per sample on the kernel
            kernels = kernels.expand(x.shape[0], -1)
        y = self.convolve(x * a_c[:, :, None, None] if c_on_map else x, kernels, None if f_on_map else bias)
        if not f_on_map:
            return y
        y = y * a_f[:, :, None, None]
        return y if bias is None else y + bias.reshape(1, -1, 1, 1)

    @torch.no_grad()
    def convert_from(self, stock: nn.Module, noise: float = 0.01) -> str:
        """Start from a stock Ultralytics ``Conv``: kernels ``W + noise · std(W) · N(0, 1)``, the four attention
        heads zero (``a_s = a_c = a_f = 1``, ``a_w = 1/n``), BN copied; returns what it did.

        Raises:
            ConversionError: a stock layer of another shape, fused, or with another activation.
        """
        description = self.convert_bank(stock, noise, "kernels")
        for head in (self.attn_spatial, self.attn_in, self.attn_out, self.attn_kernel):
            if head is not None:
                head.weight.zero_()
                head.bias.zero_()
        return f"{description}, attentions neutral"

