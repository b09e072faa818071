"""Distribution Shift Convolution (DSConv): block-quantised integer kernel with float distribution shifts.

Gennari do Nascimento, Prisacariu, Fawcett, "DSConv: Efficient Convolution Operator", ICCV 2019,
arXiv:1901.01928.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from ultralytics.nn.modules.conv import autopad
from ultralytics.utils.torch_utils import fuse_conv_and_bn

from ..registry import register
from ._utils import require, require_int, resolve_act


def _dsconv_macs(m, x, y):
    """thop rule: one convolution with the quantised kernel; once fused, thop counts the fused ``nn.Conv2d`` child."""
    if hasattr(m, "bn"):
        m.total_ops += y.numel() * m.conv.weight[0].numel()


@register(role="conv", macs=_dsconv_macs, paper="DSConv, Gennari do Nascimento, Prisacariu, Fawcett, ICCV 2019")
class DSConv2d(nn.Module):
    """DSConv followed by BatchNorm and activation (Gennari do Nascimento et al., ICCV 2019).

    The kernel ``W`` (c2, c1/g, k, k) is split along its input channels into blocks of ``block_size`` (the last
    block holds the remainder when c1/g is not a multiple). For output channel ``o``, block ``b`` and kernel
    position ``(i, j)`` the block of weights ``w`` becomes::

        q     = clamp(round(w / t), -2^(bits-1), 2^(bits-1) - 1)    # VQK: signed ``bits``-bit integers
        t     = w_ext / -2^(bits-1)             # w_ext: the block's weight of largest magnitude lands on -2^(bits-1)
        alpha = <w, q> / <q, q>                 # KDS scale: least-squares fit of the block (the paper's L2 rule)
        W_q   = alpha * q (+ beta)              # beta: optional learned KDS bias (``kds_bias=True``)

    and with ``cds=True`` a learned per-output-channel scale and shift (CDS) gives
    ``conv(x, cds_w * W_q) + cds_b``. The layer returns ``act(BN(conv(x, W_q)))`` like Ultralytics ``Conv``.

    Training keeps float shadow weights ``W`` and quantises them in every forward with a straight-through
    estimator (the forward uses exactly ``W_q``; the gradient reaches ``W`` as if quantisation were the identity).
    In eval the quantised kernel is built once and reused until a weight changes (an optimizer step, a state-dict
    load, ``train()``/``eval()``, a dtype or device move). ``integer_kernel()`` returns what a deployment stores and
    ``size_ratio()`` its size relative to fp32. ``fuse()`` folds BN into the dequantised kernel, so the fused
    kernel is float.
    """

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, d=1, act=True, bits=4, block_size=32, kds_bias=False, cds=False):
        """Build the layer; ``bits`` in 2..8, ``block_size`` >= 1 input channels, see the class docstring."""
        super().__init__()
        name = type(self).__name__
        for argument, value in (("c1", c1), ("c2", c2), ("k", k), ("s", s), ("g", g), ("d", d)):
            require_int(name, argument, value)
        require(p is None or (isinstance(p, int) and p >= 0), name, "p", p, "use None (same padding) or an int >= 0")
        require(c1 % g == 0 and c2 % g == 0, name, "g", g, f"groups must divide c1={c1} and c2={c2}")
        require(
            isinstance(bits, int) and not isinstance(bits, bool) and 2 <= bits <= 8,
            name,
            "bits",
            bits,
            "use an integer from 2 to 8 (the integer kernel is stored as int8)",
        )
        require_int(name, "block_size", block_size)
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), dilation=d, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = resolve_act(act)
        self.bits = bits
        self.block_size = block_size
        self.n_blocks = math.ceil(c1 // g / block_size)
        block_shape = (c2, self.n_blocks, k, k)
        self.kds_bias = nn.Parameter(torch.zeros(block_shape)) if kds_bias else None
        self.cds_weight = nn.Parameter(torch.ones(c2)) if cds else None
        self.cds_bias = nn.Parameter(torch.zeros(c2)) if cds else None
        self._cache = None  # (key, kernel) of the eval-mode kernel; never saved, see __getstate__

    def _quantize(self, weight):
        """Return the VQK ``q`` (as float, padded to whole blocks: c2, n_blocks, block_size, k, k) and KDS ``alpha``."""
        pad = self.n_blocks * self.block_size - weight.shape[1]
        blocks = nn.functional.pad(weight, (0, 0, 0, 0, 0, pad)).unflatten(1, (self.n_blocks, self.block_size))
        qmin = -(2 ** (self.bits - 1))
        hi, lo = blocks.amax(2, keepdim=True), blocks.amin(2, keepdim=True)
        step = torch.where(-lo >= hi, lo, hi) / qmin  # the largest-magnitude weight maps to qmin exactly
        step = torch.where(step == 0, torch.ones_like(step), step)  # all-zero block: q = 0
        q = torch.round(blocks / step).clamp_(qmin, -qmin - 1)
        qq = (q * q).sum(2)
        alpha = (blocks * q).sum(2) / torch.where(qq == 0, torch.ones_like(qq), qq)
        return q, alpha

    def _kernel(self, straight_through):
        """The convolution kernel ``cds_w * (alpha * q + beta)``; STE gradient to the shadow weight if asked."""
        weight = self.conv.weight
        q, alpha = self._quantize(weight.detach())
        kernel = alpha.unsqueeze(2) * q
        if self.kds_bias is not None:
            kernel = kernel + self.kds_bias.unsqueeze(2)
        kernel = kernel.flatten(1, 2)[:, : weight.shape[1]]
        if straight_through:
            kernel = kernel + (weight - weight.detach())  # adds exactly 0: value W_q, gradient d/dW = identity
        if self.cds_weight is not None:
            kernel = kernel * self.cds_weight.view(-1, 1, 1, 1)
        return kernel

    def _eval_kernel(self):
        """Eval-mode kernel, rebuilt only when a tensor it depends on changed (version, storage, dtype, device)."""
        if torch.jit.is_tracing():  # a cache hit would trace as a constant, a miss as ops: keep traces consistent
            return self._kernel(straight_through=False)
        tensors = [t for t in (self.conv.weight, self.kds_bias, self.cds_weight) if t is not None]
        key = tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self._kernel(straight_through=False))
        return self._cache[1]

    def dequantized_weight(self):
        """The float kernel the convolution uses, ``cds_w * (alpha * q + beta)`` (c2, c1/g, k, k), no gradient."""
        with torch.no_grad():
            return self._kernel(straight_through=False)

    @torch.no_grad()
    def integer_kernel(self):
        """Return ``(vqk, kds_scale)`` or, with ``kds_bias=True``, ``(vqk, kds_scale, kds_bias)``.

        ``vqk`` is the int8 tensor (c2, c1/g, k, k) of ``bits``-bit integers; ``kds_scale`` and ``kds_bias`` are
        float (c2, n_blocks, k, k), one value per block (a scale is negative where the block's largest-magnitude
        weight is positive, since that weight is stored as -2^(bits-1)). With ``cds=True`` the deployment also stores
        ``cds_weight`` and ``cds_bias`` (c2 floats each). These describe the kernel before ``fuse()``.
        """
        q, alpha = self._quantize(self.conv.weight)
        vqk = q.flatten(1, 2)[:, : self.conv.weight.shape[1]].to(torch.int8)
        if self.kds_bias is None:
            return vqk, alpha
        return vqk, alpha, self.kds_bias.detach().clone()

    def size_ratio(self):
        """Stored bits (VQK at ``bits`` each, fp32 KDS scales/biases, fp32 CDS) divided by the fp32 kernel's bits."""
        c2, _, kh, kw = self.conv.weight.shape
        n_weights = self.conv.weight.numel()
        n_kds = (1 + (self.kds_bias is not None)) * c2 * self.n_blocks * kh * kw
        n_cds = 2 * c2 if self.cds_weight is not None else 0
        return (n_weights * self.bits + 32 * (n_kds + n_cds)) / (32 * n_weights)

    def forward(self, x):
        """Convolve with the quantised kernel, then BN and activation."""
        trains = torch.is_grad_enabled() and self.conv.weight.requires_grad and not torch.jit.is_tracing()
        kernel = self._kernel(straight_through=True) if self.training or trains else self._eval_kernel()
        return self.act(self.bn(self.conv._conv_forward(x, kernel, self.cds_bias)))

    def forward_fuse(self, x):
        """Fused inference: one float convolution (quantised kernel with BN folded in), then activation."""
        return self.act(self.fused_conv(x))

    @torch.no_grad()
    def fuse(self):
        """Fold BN into the dequantised kernel (the fused kernel is float) and switch to ``forward_fuse``.

        BN scales each output channel, so the fused kernel is still ``integer_kernel()``'s VQK times KDS scales
        multiplied per output channel; ``integer_kernel()`` keeps describing the pre-fuse quantisation.
        """
        if not hasattr(self, "bn"):
            return self
        c = self.conv
        conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups, True)
        conv.weight.copy_(self.dequantized_weight())
        conv.bias.copy_(self.cds_bias if self.cds_bias is not None else torch.zeros_like(conv.bias))
        self.fused_conv = fuse_conv_and_bn(conv.to(c.weight), self.bn)
        del self.bn
        self.forward = self.forward_fuse
        return self

    def train(self, mode=True):
        """Set the mode and drop the cached eval kernel (it is rebuilt on the next eval forward)."""
        self._cache = None
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        """Drop the cached eval kernel, then load."""
        self._cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        """Pickle/deepcopy without the cached kernel (a checkpoint stores only the weights)."""
        return {**self.__dict__, "_cache": None}
