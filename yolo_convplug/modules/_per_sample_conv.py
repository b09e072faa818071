"""The per-sample convolution: its eager backward and its operator for ``torch.compile``.

Eager PyTorch convolves a batch with one kernel per sample as a single grouped convolution (the batch folded into
the channels, ``groups = B * g``); on CPU its backward runs faster as one convolution backward per sample
(:class:`TrainableGroupedConv`). Inductor cannot lower a ``groups`` that depends on a dynamic batch, and the
im2col + batched-matmul form that it can compile materialises a ``k * k`` times larger input (2.5x the stock
layer's time at 64 channels @80). Registered as a custom operator (``torch.library.custom_op``) with a shape-only
fake and a backward that is itself an operator, the grouped convolution stays one oneDNN call inside a compiled
graph, whose shapes follow the batch symbolically.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def out_size(n: int, k: int, stride: int, padding: int, dilation: int) -> int:
    """Output side of a convolution over a side of ``n`` pixels."""
    return (n + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def grouped_conv(x: torch.Tensor, kernels: torch.Tensor, stride: int, padding: int, dilation: int, groups: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Convolve sample ``b`` of ``x`` (B, c1, H, W) with ``kernels[b]`` (B, c2, c1/g, k, k), plus an optional
    per-channel ``bias`` (c2): one grouped convolution with the batch folded into the channels, (B, c2, H', W')."""
    b, c1, h, w = x.shape
    c2 = kernels.shape[1]
    y = F.conv2d(x.reshape(1, b * c1, h, w), kernels.reshape(b * c2, *kernels.shape[2:]),
                 None if bias is None else bias.repeat(b), stride, padding, dilation, b * groups)
    return y.reshape(b, c2, y.shape[2], y.shape[3])


@torch.library.custom_op("yolo_convplug::per_sample_conv", mutates_args=())
def per_sample_conv(x: torch.Tensor, kernels: torch.Tensor, stride: int, padding: int, dilation: int,
                    groups: int) -> torch.Tensor:
    """:func:`grouped_conv` without bias, opaque to the compiler."""
    return grouped_conv(x, kernels, stride, padding, dilation, groups)


@per_sample_conv.register_fake
def _(x, kernels, stride, padding, dilation, groups):
    k = kernels.shape[-1]
    size = [out_size(n, k, stride, padding, dilation) for n in x.shape[2:]]
    return x.new_empty(x.shape[0], kernels.shape[1], *size)


def grouped_conv_backward(grad: torch.Tensor, x: torch.Tensor, kernels: torch.Tensor, stride: int, padding: int,
                          dilation: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`grouped_conv` (without bias) for ``x`` and ``kernels``. On CPU one convolution backward
    per sample, written into the batch's gradients: oneDNN's grouped backward (the batch folded into the channels)
    costs 1.2-1.3x a dense layer's backward at strided and 256-channel shapes, the per-sample calls 1.0-1.1x
    (``scripts/per_sample_conv_forms.py``). Elsewhere one grouped convolution backward."""
    conv_args = ([stride] * 2, [padding] * 2, [dilation] * 2, False, [0, 0])
    if x.device.type == "cpu":
        gx, gk = torch.empty_like(x), torch.empty_like(kernels)
        for i in range(len(x)):
            gx[i : i + 1], gk[i], _ = torch.ops.aten.convolution_backward(
                grad[i : i + 1], x[i : i + 1], kernels[i], None, *conv_args, groups, [True, True, False])
        return gx, gk
    b, c1, h, w = x.shape
    c2 = kernels.shape[1]
    gx, gk, _ = torch.ops.aten.convolution_backward(
        grad.reshape(1, b * c2, grad.shape[2], grad.shape[3]), x.reshape(1, b * c1, h, w),
        kernels.reshape(b * c2, *kernels.shape[2:]), None, *conv_args, b * groups, [True, True, False])
    return gx.reshape_as(x), gk.reshape_as(kernels)


class TrainableGroupedConv(torch.autograd.Function):
    """:func:`grouped_conv` without bias, differentiated by :func:`grouped_conv_backward` (eager training)."""

    @staticmethod
    def forward(ctx, x, kernels, stride, padding, dilation, groups):
        """Run :func:`grouped_conv` in autocast's dtype, if on, and keep its inputs for the backward."""
        if torch.is_autocast_enabled(x.device.type):  # cast as autocast casts a convolution's inputs
            dtype = torch.get_autocast_dtype(x.device.type)
            x, kernels = x.to(dtype), kernels.to(dtype)
        ctx.save_for_backward(x, kernels)
        ctx.conv_args = stride, padding, dilation, groups
        return grouped_conv(x, kernels, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        """Input and kernel gradients; none for the integer arguments."""
        gx, gk = grouped_conv_backward(grad.contiguous(), *ctx.saved_tensors, *ctx.conv_args)
        return gx, gk, None, None, None, None


@torch.library.custom_op("yolo_convplug::per_sample_conv_backward", mutates_args=())
def per_sample_conv_backward(grad: torch.Tensor, x: torch.Tensor, kernels: torch.Tensor, stride: int, padding: int,
                             dilation: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`grouped_conv_backward`, opaque to the compiler."""
    return grouped_conv_backward(grad, x, kernels, stride, padding, dilation, groups)


@per_sample_conv_backward.register_fake
def _(grad, x, kernels, stride, padding, dilation, groups):
    return torch.empty_like(x), torch.empty_like(kernels)


def _setup_context(ctx, inputs, output):
    x, kernels, *ctx.conv_args = inputs
    ctx.save_for_backward(x, kernels)


def _backward(ctx, grad):
    x, kernels = ctx.saved_tensors
    gx, gk = per_sample_conv_backward(grad.contiguous(), x, kernels, *ctx.conv_args)
    return gx, gk, None, None, None, None


per_sample_conv.register_autograd(_backward, setup_context=_setup_context)
