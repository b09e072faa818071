"""Switchable Atrous Convolution (SAC) with weight standardisation and global context.

Qiao, Chen, Yuille, "DetectoRS: Detecting Objects with Recursive Feature Pyramid and Switchable Atrous
Convolution", CVPR 2021, arXiv:2006.02334 (Section 4, ConvAWS + SAC). ``deform=True``: deformable convolution
(Dai et al., "Deformable Convolutional Networks", ICCV 2017) in both SAC branches, the setting of DetectoRS'
published SAC results (mmcv ``SAConv2d(use_deform=True)``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from ultralytics.nn.modules.conv import autopad

from ..registry import register
from ._deform import deform_conv
from ._stock import stock_conv_bn
from ._utils import check_conv_args, require, resolve_act, spatial_mean


def _context(x, conv):
    """Global context ``conv(GAP(x))`` of a 1x1 ``conv`` as a (B, C, 1, 1) tensor.

    ``linear`` is cheaper than a 1x1 convolution on a 1x1 map.
    """
    return F.linear(spatial_mean(x), conv.weight.flatten(1), conv.bias)[..., None, None]


def _reflect_index(n, device):
    """Source rows (or columns) of a map side of ``n`` pixels mirrored by 2 at both ends, as tensor ops of ``n``.

    For ``n >= 3`` this is ``F.pad(mode="reflect")``'s index; for ``n = 2`` and ``n = 1``, where a reflection by 2
    does not exist, the mirroring repeats (period ``2n - 2``), which gives every 5-pixel window the same average as
    replicate padding. Computed from ``n`` with tensor ops (no branch), so a traced or compiled graph follows the
    input size, and a dynamic-shape ONNX export is right at every size.
    """
    i = torch.arange(-2, n + 2, device=device).abs().remainder(2 * n - 2 + 1 // n)  # 1 // n: period 1 when n = 1
    return (n - 1) - (i - (n - 1)).abs()


def _reflect_pool5(x, stride=1):
    """DetectoRS' (mmcv's) 5x5 average of ``x`` after reflect-padding by 2, with stride ``stride``."""
    h, w = x.shape[-2:]
    x = x.index_select(-1, _reflect_index(w, x.device)).index_select(-2, _reflect_index(h, x.device))
    return F.avg_pool2d(x, 5, stride)


def _standardize(weight, gamma, beta):
    """Return ``(gamma * (W - mean) / std + beta, mean, std)``; statistics per output filter, shaped (c2, 1).

    ``std = sqrt(unbiased var + 1e-5)`` as in DetectoRS' ConvAWS2d.
    """
    flat = weight.flatten(1)
    mean = flat.mean(1, keepdim=True)
    std = (torch.linalg.vector_norm(flat - mean, dim=1, keepdim=True).square() / (flat.shape[1] - 1) + 1e-5).sqrt()
    scale = gamma.view(-1, 1) / std
    return torch.addcmul(beta.view(-1, 1) - mean * scale, flat, scale).view_as(weight), mean, std


class _StandardizeAddDiff(torch.autograd.Function):
    """``(W_hat, W_hat + gamma * dW)`` with an analytic backward that allocates two weight-sized tensors.

    With ``n`` weights per filter, ``s = gamma / std`` and ``G`` the gradient reaching ``W_hat``:
    ``dL/dW = s * G + k * W - rowmean(s * G + k * W)``, ``k = -s * <G, W - mean> / ((n - 1) * std^2)``.
    """

    @staticmethod
    def forward(ctx, weight, diff, gamma, beta):
        """Standardise ``weight`` and add ``gamma * diff``."""
        w, mean, std = _standardize(weight, gamma, beta)
        ctx.save_for_backward(weight, mean, std, gamma)
        return w, torch.addcmul(w, gamma, diff)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_small, grad_large):
        """Gradients for ``weight`` and ``diff``; gamma and beta are buffers."""
        weight, mean, std, gamma = ctx.saved_tensors
        flat = weight.flatten(1)
        grad = (grad_small + grad_large).flatten(1)
        dot = torch.linalg.vecdot(grad, flat, dim=1).unsqueeze(1) - mean * grad.sum(1, keepdim=True)
        scale = gamma.view(-1, 1) / std
        grad.mul_(scale).addcmul_(flat, -scale * dot / ((flat.shape[1] - 1) * std.square()))
        return grad.sub_(grad.mean(1, keepdim=True)).view_as(weight), grad_large * gamma, None, None


def _saconv_macs(m, x, y):
    """thop rule for the two atrous convolutions, which thop does not see (``F.conv2d``/``deform_conv2d`` calls).

    Each branch: ``k * k * c1 / g`` MACs per output value. With ``deform``, each branch also samples its ``k * k * c1``
    input values per output position bilinearly, counted as 4 MACs a value. The offset and switch convolutions are
    modules that thop counts itself; poolings are not counted.
    """
    m.total_ops += 2 * y.numel() * m.conv.weight[0].numel()
    if m.deform:
        m.total_ops += 2 * 4 * y[:, 0].numel() * m.conv.in_channels * m.conv.kernel_size[0] * m.conv.kernel_size[1]


@register(role="conv", macs=_saconv_macs, paper="DetectoRS, Qiao, Chen, Yuille, CVPR 2021")
class SAConv2d(nn.Module):
    """Switchable Atrous Convolution followed by BatchNorm and activation (DetectoRS, CVPR 2021).

    With ``x`` the input, ``GAP`` global average pooling and ``W`` the learned kernel::

        W_hat = gamma * (W - mean(W)) / sqrt(var(W) + 1e-5) + beta      # ConvAWS, statistics per output filter
        x'    = x + conv1x1_pre(GAP(x))                                  # pre-context
        S     = conv1x1_switch(avgpool5x5(x'))        (stride s)         # switch, init weight 0 bias 1 -> S = 1
        y     = S * conv(x', W_hat, dilation d) + (1 - S) * conv(x', W_hat + gamma * dW, dilation 3d)  # dW init 0
        out   = act(BN(y + conv1x1_post(GAP(y))))                        # post-context, BN, activation

    ``gamma``/``beta`` are buffers, set at construction to the per-filter std and mean of the initial ``W`` (so
    ``W_hat = W``: a fresh module has a fresh ``Conv``'s scale). The weight difference ``dW`` is in units of the
    filter's scale ``gamma``, as DetectoRS' ``dW`` is in units of its ``gamma = 1`` kernel: an optimizer step moves the
    large-dilation kernel by the same fraction of the kernel either way (and a checkpoint with ``gamma = 1`` computes
    DetectoRS' ``W_hat + dW`` exactly). Both context convs start at zero, so a fresh module
    is a plain convolution. Loading a plain-convolution state dict (``conv.weight`` and no
    ``weight_gamma``), e.g. an Ultralytics ``Conv``'s, converts it as DetectoRS does: ``gamma = std(W)`` and
    ``beta = mean(W)``, so ``W_hat`` equals the loaded kernel, and the SAC-specific tensors the state dict lacks
    get their initial values, so the converted module computes exactly what the plain ``Conv`` did.

    ``avgpool5x5`` is DetectoRS' (mmcv ``SAConv2d``): reflect padding by 2, then a 5x5 average, on every map whose
    sides have 3 pixels or more. A side of 1 or 2 pixels cannot be reflected by 2; there the mirroring is repeated,
    which averages each window as replicate padding would (the pixel itself on a 1x1 map): a defined result on the
    tiny maps of small images, computed by the same index arithmetic (no branch on the size, so traced, compiled
    and dynamic-shape ONNX graphs are right at every size). Because the 5x5 average and the switch's 1x1
    convolution are both linear and channel-/space-separable, the switch is computed as ``avgpool(conv1x1(x'))`` on
    one channel, the same map at a fraction of the cost; it runs at its parameters' precision even under autocast,
    as its weight gradient (a sum of ``x' * (small - large)`` over every pixel) overflows float16. Training
    differentiates the standardisation with a hand-written backward (a few passes over the weight instead of
    autograd's); ``fuse()`` precomputes both kernels and folds BN into the post-context. ``k = 1`` is refused: a
    1x1 kernel sees no dilation, so both branches would be the same convolution.

    ``deform=True`` (DetectoRS' published setting, mmcv's ``use_deform``) makes both branches deformable
    convolutions (torchvision's ``deform_conv2d``) whose sampling offsets come from a 3x3 convolution (stride ``s``)
    of ``avgpool5x5(x')``, each branch its own ``2 k^2`` offset channels (the first half of ``offset``'s output for
    the dilation-``d`` branch, the second for ``3d``). ``offset`` starts at zero, so a fresh or converted deformable
    module computes exactly what the non-deformable one does; ``fuse()`` keeps the offset convolution. Operands
    of the deformable convolutions share the input's dtype (float32 for bfloat16, which torchvision lacks). It
    exports to ONNX ``DeformConv``, which needs opset >= 19 (importing this module registers the export of
    torchvision's op; below 19 the export stops with an error that says so).
    """

    deform = False  # the default for modules pickled before ``deform`` existed (old checkpoints)
    conversion_error = 1e-5  # convert_from is exact: W_hat = W, switch 1, contexts and dW zero

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, d=1, act=True, deform=False):
        """Build the layer; see the class docstring. ``k`` must be odd and ``p`` "same" so both branches align."""
        super().__init__()
        name = type(self).__name__
        check_conv_args(name, c1, c2, k, s, None, g, d)
        require(k % 2 == 1, name, "k", k, "SAConv2d needs an odd kernel size (3, 5, ...) so the switch aligns")
        require(
            k > 1,
            name,
            "k",
            k,
            "a 1x1 kernel sees no dilation, so SAC's dilation-3d branch would repeat the dilation-d one: use k=3 (or "
            "5, ...), or keep a stock Conv for 1x1 layers",
        )
        require(
            p is None or p == autopad(k, None, d),
            name,
            "p",
            p,
            f"leave p=None ('same' padding {autopad(k, None, d)}); the dilated branch and the switch assume it",
        )
        require(isinstance(deform, bool), name, "deform", deform, "use True (deformable branches) or False")
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, None, d), dilation=d, groups=g, bias=False)
        self.register_buffer("weight_gamma", torch.ones(c2, 1, 1, 1))
        self.register_buffer("weight_beta", torch.zeros(c2, 1, 1, 1))
        self.weight_diff = nn.Parameter(torch.zeros_like(self.conv.weight))
        self.pre_context = nn.Conv2d(c1, c1, 1)
        self.switch = nn.Conv2d(c1, 1, 1)
        self.post_context = nn.Conv2d(c2, c2, 1)
        self.bn = nn.BatchNorm2d(c2)
        self.act = resolve_act(act)
        self.large_dilation = 3 * d
        self.large_padding = autopad(k, None, self.large_dilation)
        self.deform = deform
        if deform:
            self.offset = nn.Conv2d(c1, 2 * 2 * k * k, 3, s, 1)  # (dy, dx) per kernel tap, for each branch
        self.reset_sac_parameters()
        self._match_standardization_to_kernel()

    @torch.no_grad()
    def _match_standardization_to_kernel(self):
        """Set ``gamma = std(W)`` and ``beta = mean(W)`` per filter, so that ``W_hat = W``.

        A fresh module then starts at the scale of a fresh ``nn.Conv2d`` (kernel variance ``1 / (3 fan_in)``) and
        equals one converted from a fresh Conv. With ``gamma = 1`` the standardised kernel would have unit variance
        per weight, its BN input about ``3 fan_in`` times a Conv's variance, and BN's ``running_var`` could overflow
        float16 (65504) in the half-precision checkpoints Ultralytics saves.
        """
        _, mean, std = _standardize(self.conv.weight, self.weight_gamma, self.weight_beta)
        self.weight_gamma.copy_(std.view_as(self.weight_gamma))
        self.weight_beta.copy_(mean.view_as(self.weight_beta))

    def reset_sac_parameters(self):
        """Set the SAC tensors to their initial values: zero contexts, weight difference and offsets, switch = 1."""
        with torch.no_grad():
            for name, value in self._sac_initial_state().items():
                self.get_parameter(name).copy_(value)

    def _sac_initial_state(self):
        """Initial values of the tensors a plain convolution does not have, keyed by state-dict name."""
        state = {
            "weight_diff": torch.zeros_like(self.weight_diff),
            "pre_context.weight": torch.zeros_like(self.pre_context.weight),
            "pre_context.bias": torch.zeros_like(self.pre_context.bias),
            "switch.weight": torch.zeros_like(self.switch.weight),
            "switch.bias": torch.ones_like(self.switch.bias),
            "post_context.weight": torch.zeros_like(self.post_context.weight),
            "post_context.bias": torch.zeros_like(self.post_context.bias),
        }
        if self.deform:
            state["offset.weight"] = torch.zeros_like(self.offset.weight)
            state["offset.bias"] = torch.zeros_like(self.offset.bias)
        return state

    def standardized_weight(self):
        """Return ``W_hat = gamma * (W - mean) / std + beta`` (c2, c1/g, k, k)."""
        return _standardize(self.conv.weight, self.weight_gamma, self.weight_beta)[0]

    def _kernels(self):
        """``(W_hat, W_hat + gamma * dW)``; a hand-written backward makes training cheap (autograd's var_mean is
        slow)."""
        if torch.jit.is_tracing():  # a custom autograd.Function does not trace or export: same values, plain ops
            w = self.standardized_weight()
            return w, torch.addcmul(w, self.weight_gamma, self.weight_diff)
        return _StandardizeAddDiff.apply(self.conv.weight, self.weight_diff, self.weight_gamma, self.weight_beta)

    def _switchable(self, x, w_small, w_large):
        """Pre-context, switch and the two atrous (optionally deformable) convolutions blended by the switch."""
        x = x + _context(x, self.pre_context)
        with torch.autocast(x.device.type, enabled=False):  # the switch's weight gradient sums x' * (small - large)
            s = self.switch(x.to(self.switch.weight.dtype))  # over every pixel: it overflows float16 (65504)
        s = _reflect_pool5(s, self.conv.stride)  # = conv1x1_switch(pool(x')) sampled at stride s: both linear
        conv = self.conv
        if self.deform:
            offsets = self.offset(_reflect_pool5(x)).chunk(2, 1)
            small = deform_conv(x, offsets[0], w_small, conv.stride, conv.padding, conv.dilation)
            large = deform_conv(x, offsets[1], w_large, conv.stride, self.large_padding, self.large_dilation)
        else:
            small = F.conv2d(x, w_small, None, conv.stride, conv.padding, conv.dilation, conv.groups)
            large = F.conv2d(x, w_large, None, conv.stride, self.large_padding, self.large_dilation, conv.groups)
        return torch.lerp(large, small, s.to(small.dtype))  # s * small + (1 - s) * large

    def forward(self, x):
        """Apply SAC, post-context, BatchNorm and activation."""
        y = self._switchable(x, *self._kernels())
        return self.act(self.bn(y.add_(_context(y, self.post_context))))  # y is a fresh tensor autograd did not save

    def forward_fuse(self, x):
        """Fused inference: precomputed kernels, BN folded into the post-context and one per-channel scale."""
        y = self._switchable(x, self.fused_weight_small, self.fused_weight_large)
        return self.act(torch.addcmul(_context(y, self.post_context), y, self.fused_scale))

    @torch.no_grad()
    def fuse(self):
        """Fold BN and weight standardisation for inference; switch ``forward`` to ``forward_fuse``.

        BN in eval is ``a * z + b`` per channel with ``z = y + P(GAP(y))`` and ``P(v) = Wp v + bp``, so
        ``BN(z) = a * y + (diag(a) Wp) GAP(y) + (a * bp + b)``: the post-context absorbs BN exactly and only the
        per-channel scale ``a`` remains, applied in the same pass that adds the context. ``a`` is *not* folded
        into the kernels because recovering ``GAP(y)`` from ``GAP(a * y)`` would divide by ``a`` (inexact or
        impossible where a BN weight is 0). The standardised kernels ``W_hat`` and ``W_hat + dW`` are computed
        once here instead of every forward; the offsets (deform) still come from the input.
        """
        if not hasattr(self, "bn"):
            return self
        bn = self.bn
        a = bn.weight / (bn.running_var + bn.eps).sqrt()
        w_small, w_large = self._kernels()
        self.register_buffer("fused_weight_small", w_small)
        self.register_buffer("fused_weight_large", w_large)
        self.register_buffer("fused_scale", a.view(-1, 1, 1))
        self.post_context.weight.mul_(a.view(-1, 1, 1, 1))
        self.post_context.bias.mul_(a).add_(bn.bias - bn.running_mean * a)
        del self.bn
        self.forward = self.forward_fuse
        return self

    def convert_from(self, stock: nn.Module) -> str:
        """Warm start from an Ultralytics ``Conv`` of the same geometry: exactly the stock layer's function.

        The kernel goes through the plain-convolution conversion of ``load_state_dict`` (``W_hat`` = the stock
        kernel), BN is copied (statistics, ``eps``, ``momentum``), the SAC tensors (offsets included) get their
        initial values. Raises ``ConversionError`` naming the mismatch for another geometry or activation, or a
        fused ``Conv``.
        """
        _, bn = stock_conv_bn("SAConv2d", stock, self.conv, self.act)
        self.load_state_dict(stock.state_dict())
        self.bn.eps, self.bn.momentum = bn.eps, bn.momentum
        return "exact: W_hat = the stock kernel (gamma = std, beta = mean), BN copied, SAC tensors at their start"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        """Convert a plain-convolution state dict (no ``weight_gamma``) as DetectoRS does, then load."""
        weight = state_dict.get(prefix + "conv.weight")
        if prefix + "weight_gamma" not in state_dict and weight is not None and weight.shape == self.conv.weight.shape:
            weight = weight.to(self.weight_gamma)
            _, mean, std = _standardize(weight, self.weight_gamma, self.weight_beta)
            state_dict[prefix + "weight_gamma"] = std.view_as(self.weight_gamma)
            state_dict[prefix + "weight_beta"] = mean.view_as(self.weight_beta)
            for name, value in self._sac_initial_state().items():
                state_dict.setdefault(prefix + name, value)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
