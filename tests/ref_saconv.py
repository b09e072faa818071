"""Naive SAConv reference, written independently of ``yolo_convplug.modules.saconv``.

The DetectoRS formulation (Qiao et al., CVPR 2021, arXiv:2006.02334) as the seed writes it, corrected: ConvAWS weight
standardisation (nested means, unbiased variance), pre-context ``x + conv1x1(GAP(x))``, switch
``conv1x1_stride_s(avgpool5x5(x))`` pooled at all ``c1`` channels, two explicit ``F.conv2d`` (dilation ``d`` and
``3d``) with no state swapped on ``self``, ``S * out_s + (1 - S) * out_l``, post-context, BN, SiLU. The seed's
reflect padding (which fails below 3x3 maps) is replaced by zero padding averaged over valid pixels. Parameters carry
the module's names and shapes, so ``load_state_dict`` moves weights between the two.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from yolo_convplug.modules.saconv import SAConv2d


class SAConvNaive(nn.Module):
    """SAC computed the straightforward way: every step its own full-size tensor, standardisation by autograd."""

    def __init__(self, c1, c2, k=3, s=1, d=1):
        super().__init__()
        self.k, self.s, self.d = k, s, d
        self.conv = nn.Conv2d(c1, c2, k, s, d * (k - 1) // 2, d, bias=False)
        self.register_buffer("weight_gamma", torch.ones(c2, 1, 1, 1))
        self.register_buffer("weight_beta", torch.zeros(c2, 1, 1, 1))
        self.weight_diff = nn.Parameter(torch.zeros_like(self.conv.weight))
        self.pre_context = nn.Conv2d(c1, c1, 1)
        self.switch = nn.Conv2d(c1, 1, 1, s)
        self.post_context = nn.Conv2d(c2, c2, 1)
        for m in (self.pre_context, self.post_context, self.switch):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        nn.init.ones_(self.switch.bias)
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
        switch = self.switch(F.avg_pool2d(x, 5, 1, 2, count_include_pad=False))
        w = self.standardized_weight()
        k, s, d = self.k, self.s, self.d
        out_s = F.conv2d(x, w, None, s, d * (k - 1) // 2, d)
        out_l = F.conv2d(x, w + self.weight_diff, None, s, 3 * d * (k - 1) // 2, 3 * d)
        out = switch * out_s + (1 - switch) * out_l
        out = out + self.post_context(F.adaptive_avg_pool2d(out, 1)).expand_as(out)
        return self.act(self.bn(out))


def make_reference(c1, c2, k=3, s=1):
    """The naive reference of ``SAConv2d(c1, c2, k, s)``."""
    return SAConvNaive(c1, c2, k, s)


def make_module(c1, c2, k=3, s=1):
    """The module under test."""
    return SAConv2d(c1, c2, k, s)
