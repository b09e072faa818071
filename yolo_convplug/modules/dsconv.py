"""Distribution Shift Convolution (DSConv): block-quantised integer kernel with float distribution shifts.

Gennari do Nascimento, Prisacariu, Fawcett, "DSConv: Efficient Convolution Operator", ICCV 2019,
arXiv:1901.01928. Official code: github.com/ActiveVisionLab/DSConv.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from ultralytics.nn.modules.conv import autopad
from ultralytics.utils.torch_utils import fuse_conv_and_bn

from ..registry import ConversionError, register
from ._stock import copy_bn, stock_conv_bn
from ._utils import check_conv_args, require, require_int, resolve_act

MODES = ("ste", "shift")


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

    Two training modes:

    - ``mode="ste"`` (default; the YAMLs use it): float shadow weights ``W`` (``conv.weight``) are quantised in
      every forward with a straight-through estimator (the forward uses exactly ``W_q``; the gradient reaches ``W``
      as if quantisation were the identity), so ``q`` and ``alpha`` follow ``W``. This is quantisation-aware
      training, the mode for training from scratch, where the integers must be free to move.
    - ``mode="shift"``: the paper's way of adapting a pretrained network, and the official code's layout (integer
      weights plus a learnable ``alpha``, converted from a pretrained conv by its ``DSConvEngine``). The VQK ``q``
      is fixed, an int8 buffer ``vqk`` quantised once from ``W`` (at construction, in ``convert_from`` or in
      ``set_mode("shift")``), and only the distribution shifts train: the KDS scales ``kds_scale`` (a parameter,
      one per block, starting at the least-squares ``alpha``), ``kds_bias`` and CDS when enabled. ``conv.weight``,
      the float kernel ``q`` was quantised from, becomes a buffer: it cannot train (Ultralytics' trainer re-enables
      ``requires_grad`` on frozen parameters, so freezing a parameter would not do). The mode for fine-tuning a
      converted pretrained model without moving its integers.

    YAML rows pass ``mode`` positionally after ``cds``: ``[-1, 1, DSConv2d, [128, 3, 2, None, 1, 1, True, 4, 32,
    False, False, "shift"]]``.

    Not done: activation quantisation. The paper and the official code (``Activation.py``) also quantise the
    activations, to block floating point over blocks of input channels, so the convolution can run on integers; here
    the input and the convolution stay float and only the kernel is quantised (memory, not integer arithmetic).

    In eval the quantised kernel is built once and reused until a tensor it depends on changes (an optimizer step,
    a state-dict load, ``train()``/``eval()``, a dtype or device move). ``integer_kernel()`` returns what a
    deployment stores and ``size_ratio()`` its size relative to fp32. ``fuse()`` folds BN into the dequantised
    kernel, so the fused kernel is float. ``convert_from(stock Conv)`` quantises the stock kernel (in either mode)
    and copies its BN.
    """

    mode = "ste"  # the class default also serves checkpoints pickled before modes existed
    conversion_error = 0.08  # convert_from quantises the kernel: output error about 0.06 at the default 4 bits

    def __init__(
        self,
        c1,
        c2,
        k=3,
        s=1,
        p=None,
        g=1,
        d=1,
        act=True,
        bits=4,
        block_size=32,
        kds_bias=False,
        cds=False,
        mode="ste",
    ):
        """Build the layer; ``bits`` in 2..8, ``block_size`` >= 1 input channels, ``mode`` "ste" or "shift"."""
        super().__init__()
        name = type(self).__name__
        check_conv_args(name, c1, c2, k, s, p, g, d)
        require(
            isinstance(bits, int) and not isinstance(bits, bool) and 2 <= bits <= 8,
            name,
            "bits",
            bits,
            "use an integer from 2 to 8 (the integer kernel is stored as int8)",
        )
        require_int(name, "block_size", block_size)
        require(mode in MODES, name, "mode", mode, 'use "ste" (train the float kernel) or "shift" (train the shifts)')
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
        self.set_mode(mode)

    def _blocks(self, t):
        """(c2, c1/g, k, k) -> (c2, n_blocks, block_size, k, k), the last block zero-padded."""
        pad = self.n_blocks * self.block_size - t.shape[1]
        return F.pad(t, (0, 0, 0, 0, 0, pad)).unflatten(1, (self.n_blocks, self.block_size))

    def _quantize(self, weight):
        """Return the VQK ``q`` (as float, in blocks: c2, n_blocks, block_size, k, k) and KDS ``alpha``."""
        blocks = self._blocks(weight)
        qmin = -(2 ** (self.bits - 1))
        hi, lo = blocks.amax(2, keepdim=True), blocks.amin(2, keepdim=True)
        step = torch.where(-lo >= hi, lo, hi) / qmin  # the largest-magnitude weight maps to qmin exactly
        step = torch.where(step == 0, torch.ones_like(step), step)  # all-zero block: q = 0
        q = torch.round(blocks / step).clamp_(qmin, -qmin - 1)
        qq = (q * q).sum(2)
        alpha = (blocks * q).sum(2) / torch.where(qq == 0, torch.ones_like(qq), qq)
        return q, alpha

    def _vqk_from_weight(self):
        """Quantise the shadow weight: ``(vqk, alpha)``, the int8 VQK (c2, c1/g, k, k) and the KDS scales."""
        weight = self.conv.weight.detach()
        q, alpha = self._quantize(weight)
        return q.flatten(1, 2)[:, : weight.shape[1]].to(torch.int8), alpha

    @torch.no_grad()
    def set_mode(self, mode):
        """Switch between "ste" and "shift" (see the class docstring); the kernel the layer computes is unchanged.

        To "shift": ``vqk`` and ``kds_scale`` are quantised from ``conv.weight``, which becomes a buffer. To "ste":
        ``conv.weight`` becomes a parameter again, set to ``kds_scale * vqk`` (which quantises back to the same
        ``vqk`` and scales). ``kds_bias`` and CDS are kept. Build the optimizer after switching.
        """
        require(mode in MODES, type(self).__name__, "mode", mode, 'use "ste" or "shift"')
        if mode == self.mode:
            return self
        weight = self.conv.weight.detach()
        del self.conv.weight
        if mode == "shift":
            self.conv.register_buffer("weight", weight)
            vqk, alpha = self._vqk_from_weight()
            self.register_buffer("vqk", vqk)
            self.kds_scale = nn.Parameter(alpha)
        else:
            kernel = (self.kds_scale.unsqueeze(2) * self._blocks(self.vqk.to(weight))).flatten(1, 2)
            self.conv.weight = nn.Parameter(kernel[:, : weight.shape[1]].contiguous())
            del self.vqk, self.kds_scale
        self.mode = mode
        self._cache = None
        return self

    def _integers_and_scales(self):
        """``(q, alpha)``: the VQK in blocks (float) and the KDS scales, from the shadow weight or the frozen VQK."""
        if self.mode == "shift":
            return self._blocks(self.vqk.to(self.kds_scale.dtype)), self.kds_scale
        return self._quantize(self.conv.weight.detach())

    def _kernel(self, straight_through):
        """The convolution kernel ``cds_w * (alpha * q + beta)``; STE gradient to the shadow weight if asked."""
        q, alpha = self._integers_and_scales()
        kernel = alpha.unsqueeze(2) * q
        if self.kds_bias is not None:
            kernel = kernel + self.kds_bias.unsqueeze(2)
        weight = self.conv.weight
        kernel = kernel.flatten(1, 2)[:, : weight.shape[1]]
        if straight_through and self.mode == "ste":
            kernel = kernel + (weight - weight.detach())  # adds exactly 0: value W_q, gradient d/dW = identity
        if self.cds_weight is not None:
            kernel = kernel * self.cds_weight.view(-1, 1, 1, 1)
        return kernel

    def _kernel_tensors(self):
        """The tensors the kernel is computed from (the eval cache's key; any trainable one means autograd)."""
        own = (self.vqk, self.kds_scale) if self.mode == "shift" else (self.conv.weight,)
        return [t for t in (*own, self.kds_bias, self.cds_weight) if t is not None]

    def _eval_kernel(self):
        """Eval-mode kernel, rebuilt only when a tensor it depends on changed (version, storage, dtype, device)."""
        if torch.jit.is_tracing():  # a cache hit would trace as a constant, a miss as ops: keep traces consistent
            return self._kernel(straight_through=False)
        key = tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in self._kernel_tensors())
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
        float (c2, n_blocks, k, k), one value per block (a scale starts negative where the block's largest-magnitude
        weight is positive, since that weight is stored as -2^(bits-1)). With ``cds=True`` the deployment also stores
        ``cds_weight`` and ``cds_bias`` (c2 floats each). These describe the kernel before ``fuse()``.
        """
        if self.mode == "shift":
            vqk, alpha = self.vqk.clone(), self.kds_scale.detach().clone()
        else:
            vqk, alpha = self._vqk_from_weight()
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

    @torch.no_grad()
    def convert_from(self, stock):
        """Start from a stock Ultralytics ``Conv``: quantise its kernel (VQK and KDS scales), copy its BN.

        The shadow weight (``conv.weight``) becomes the stock kernel; KDS bias and CDS start at their identity
        (0; 1 and 0). Returns the bit width and the kernel's relative quantisation error ``|W_q - W| / |W|``
        (Frobenius norms), which bounds how far the converted layer's convolution is from the stock one.

        Raises:
            ConversionError: the stock conv differs in geometry (c1, c2, k, s, p, g, d) or activation, has a
                bias, or is fused (no BN).
        """
        if not hasattr(self, "bn"):
            raise ConversionError("this DSConv2d is fused; convert before fusing")
        conv = self.conv
        theirs, bn = stock_conv_bn("DSConv2d", stock, conv, self.act)
        if theirs.bias is not None:
            raise ConversionError("the stock conv has a bias (fused?); DSConv2d's conv has none")
        conv.weight.copy_(theirs.weight)
        copy_bn(self.bn, bn)
        for t, value in ((self.kds_bias, 0.0), (self.cds_weight, 1.0), (self.cds_bias, 0.0)):
            if t is not None:
                t.fill_(value)
        if self.mode == "shift":  # the frozen VQK and its scales now come from the stock kernel
            vqk, alpha = self._vqk_from_weight()
            self.vqk.copy_(vqk)
            self.kds_scale.copy_(alpha)
        self._cache = None
        error = (self.dequantized_weight() - theirs.weight).norm() / theirs.weight.norm().clamp_min(1e-12)
        return f"{self.bits}-bit, kernel error {error.item():.3f}"

    def forward(self, x):
        """Convolve with the quantised kernel, then BN and activation."""
        trains = torch.is_grad_enabled() and not torch.jit.is_tracing()
        trains = trains and any(t.requires_grad for t in self._kernel_tensors())
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
