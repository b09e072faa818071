"""Naive SAConv reference, written independently of ``yolo_convplug.modules.saconv``.

The DetectoRS formulation (Qiao et al., CVPR 2021, arXiv:2006.02334) as the blog writes it, corrected: ConvAWS weight
standardisation (nested means, unbiased variance), pre-context ``x + conv1x1(GAP(x))``, switch
``conv1x1_stride_s(avgpool5x5(x))`` pooled at all ``c1`` channels, two explicit convolutions (dilation ``d`` and
``3d``) with no state swapped on ``self``, ``S * out_s + (1 - S) * out_l``, post-context, BN, SiLU. The pooling is
mmcv's (``F.pad(x, (2, 2, 2, 2), mode="reflect")`` then ``F.avg_pool2d(x, 5)``); a side of 1 or 2 pixels, which mmcv
cannot reflect, is padded with ``mode="replicate"`` instead (the module's documented fallback), side by side.

``deform=True`` follows mmcv's ``SAConv2d(use_deform=True)``: two offset convolutions ``offset_s``/``offset_l``
(3x3, stride ``s``) of the pooled input, and each branch a deformable convolution: by default computed here by
bilinear sampling with ``F.grid_sample`` (offsets ``(dy, dx)`` per kernel tap, row-major taps) and one einsum;
``mmcv_deform_conv=True`` calls torchvision's ``deform_conv2d`` as mmcv's forward calls its own (same offset layout).

Every tensor is loaded from the module under test with :func:`load_from_module` (the buffers' initial values here
are placeholders), so both compute with the same gamma and beta whatever rule set them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def deform_conv_by_sampling(x, offset, w, stride, padding, dilation):
    """Deformable convolution (groups 1, one offset group): sample every tap bilinearly, then contract."""
    b, c, h, wd = x.shape
    o, _, k, _ = w.shape
    ho, wo = offset.shape[2:]
    rows = torch.arange(ho, dtype=x.dtype).view(ho, 1) * stride - padding
    cols = torch.arange(wo, dtype=x.dtype).view(1, wo) * stride - padding
    taps = []
    for t in range(k * k):
        py = rows + (t // k) * dilation + offset[:, 2 * t]  # (B, Ho, Wo)
        px = cols + (t % k) * dilation + offset[:, 2 * t + 1]
        grid = torch.stack((2 * px / (wd - 1) - 1, 2 * py / (h - 1) - 1), -1)  # align_corners=True pixel centres
        taps.append(F.grid_sample(x, grid, "bilinear", "zeros", align_corners=True))  # (B, C, Ho, Wo)
    return torch.einsum("bcthw,oct->bohw", torch.stack(taps, 2), w.view(o, c, k * k))


def mmcv_pool(x):
    """mmcv's switch input: reflect-pad by 2, 5x5 average; per side, replicate where a side is under 3 pixels."""
    for pad, n in (((2, 2, 0, 0), x.shape[-1]), ((0, 0, 2, 2), x.shape[-2])):
        x = F.pad(x, pad, mode="reflect" if n >= 3 else "replicate")
    return F.avg_pool2d(x, 5, 1, 0)


def _torchvision_deform_conv(x, offset, w, stride, padding, dilation):
    from torchvision.ops import deform_conv2d

    return deform_conv2d(x, offset, w, None, stride, padding, dilation)


class SAConvNaive(nn.Module):
    """SAC computed the straightforward way: every step its own full-size tensor, standardisation by autograd."""

    def __init__(self, c1, c2, k=3, s=1, d=1, deform=False, mmcv_deform_conv=False):
        super().__init__()
        self.k, self.s, self.d, self.deform = k, s, d, deform
        self.deform_fn = _torchvision_deform_conv if mmcv_deform_conv else deform_conv_by_sampling
        self.conv = nn.Conv2d(c1, c2, k, s, d * (k - 1) // 2, d, bias=False)
        self.register_buffer("weight_gamma", torch.ones(c2, 1, 1, 1))
        self.register_buffer("weight_beta", torch.zeros(c2, 1, 1, 1))
        self.weight_diff = nn.Parameter(torch.zeros_like(self.conv.weight))
        self.pre_context = nn.Conv2d(c1, c1, 1)
        self.switch = nn.Conv2d(c1, 1, 1, s)
        self.post_context = nn.Conv2d(c2, c2, 1)
        if deform:
            self.offset_s = nn.Conv2d(c1, 2 * k * k, 3, s, 1)
            self.offset_l = nn.Conv2d(c1, 2 * k * k, 3, s, 1)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def standardized_weight(self):
        w = self.conv.weight
        mean = w.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
        w = w - mean
        std = torch.sqrt(w.view(w.size(0), -1).var(dim=1) + 1e-5).view(-1, 1, 1, 1)
        return self.weight_gamma * (w / std) + self.weight_beta

    def forward(self, x):
        x = x + self.pre_context(F.adaptive_avg_pool2d(x, 1)).expand_as(x)
        pooled = mmcv_pool(x)
        switch = self.switch(pooled)
        w = self.standardized_weight()
        k, s, d = self.k, self.s, self.d
        dl = 3 * d
        if self.deform:
            out_s = self.deform_fn(x, self.offset_s(pooled), w, s, d * (k - 1) // 2, d)
            out_l = self.deform_fn(x, self.offset_l(pooled), w + self.weight_gamma * self.weight_diff, s,
                                   dl * (k - 1) // 2, dl)
        else:
            out_s = F.conv2d(x, w, None, s, d * (k - 1) // 2, d)
            out_l = F.conv2d(x, w + self.weight_gamma * self.weight_diff, None, s, dl * (k - 1) // 2, dl)
        out = switch * out_s + (1 - switch) * out_l
        out = out + self.post_context(F.adaptive_avg_pool2d(out, 1)).expand_as(out)
        return self.act(self.bn(out))


def load_from_module(ref: SAConvNaive, module: nn.Module) -> SAConvNaive:
    """Copy every tensor of ``module`` into ``ref`` (strict); the module's one ``offset`` conv holds the small
    branch's offsets in its first half of output channels and the large branch's in its second half."""
    state = dict(module.state_dict())
    if ref.deform:
        for name in ("weight", "bias"):
            state[f"offset_s.{name}"], state[f"offset_l.{name}"] = state.pop(f"offset.{name}").chunk(2)
    ref.load_state_dict(state)
    return ref
