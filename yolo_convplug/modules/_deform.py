"""Deformable convolution for the modules that sample off the grid (SAConv2d with ``deform=True``, DCNv2):
torchvision's ``deform_conv2d`` with safe operands, and its ONNX export as ``DeformConv``.

Importing this file registers the export of ``torchvision::deform_conv2d`` with the TorchScript ONNX exporter (which
Ultralytics uses); it does not import torchvision, which the forward imports when it first runs.
"""

from __future__ import annotations

import torch
from torch.onnx import register_custom_op_symbolic, symbolic_helper

DEFORM_OPSET = 19  # ONNX's DeformConv


def deform_conv(x, offset, weight, stride, padding, dilation, mask=None, bias=None):
    """``torchvision.ops.deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask)`` with:

    - every operand in one dtype, ``x``'s (autocast mixes them), float32 where ``x`` is bfloat16 (torchvision has no
      bfloat16 kernel); the result has that dtype;
    - non-finite offsets replaced by finite ones (``nan_to_num``): torchvision indexes memory with the sampling
      positions, and a NaN position reads out of bounds (a crash depending on the address). Non-finite input still
      propagates, as values.

    ``offset`` is torchvision's (and mmcv's) layout: (B, 2·offset_groups·kh·kw, Ho, Wo), (dy, dx) per kernel tap;
    ``mask`` (B, offset_groups·kh·kw, Ho, Wo) multiplies each sampled value (DCNv2's modulation).
    """
    from torchvision.ops import deform_conv2d

    dtype = torch.float32 if x.dtype == torch.bfloat16 else x.dtype
    bias, mask = (None if t is None else t.to(dtype) for t in (bias, mask))
    return deform_conv2d(x.to(dtype), torch.nan_to_num(offset.to(dtype)), weight.to(dtype), bias, stride, padding,
                         dilation, mask)


@symbolic_helper.parse_args("v", "v", "v", "v", "v", "i", "i", "i", "i", "i", "i", "i", "i", "b")
def _deform_conv2d_onnx(g, x, weight, offset, mask, bias, sh, sw, ph, pw, dh, dw, groups, offset_groups, use_mask):
    """``torchvision::deform_conv2d`` as ONNX ``DeformConv`` (opset 19)."""
    inputs = (x, weight, offset, bias, mask) if use_mask else (x, weight, offset, bias)
    return g.op("DeformConv", *inputs, strides_i=[sh, sw], pads_i=[ph, pw, ph, pw], dilations_i=[dh, dw],
                group_i=groups, offset_group_i=offset_groups)


def _deform_conv2d_onnx_too_old(g, *args):
    """Refuse an ONNX export below opset 19, which has no deformable convolution."""
    raise RuntimeError(
        f"deformable convolution (torchvision's deform_conv2d in DCNv2, SAConv2d(deform=True)): ONNX has it "
        f"(DeformConv) from opset {DEFORM_OPSET} on; export with opset={DEFORM_OPSET} (`yolo export format=onnx "
        f"opset={DEFORM_OPSET}`; onnxruntime's CPU provider runs it, other runtimes may not), or deploy a model "
        "without deformable layers (SAConv2d with deform=False, Conv instead of DCNv2)"
    )


register_custom_op_symbolic("torchvision::deform_conv2d", _deform_conv2d_onnx_too_old, 7)
register_custom_op_symbolic("torchvision::deform_conv2d", _deform_conv2d_onnx, DEFORM_OPSET)
