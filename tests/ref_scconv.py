"""Naive SCConv reference, written independently of ``yolo_convplug.modules.scconv``.

A literal reading of the paper (Li, Wen, He, CVPR 2023): the SRU normalises gamma as ``gamma / sum(gamma)``, builds the
masks with ``torch.where``, splits with ``torch.split`` and concatenates; the CRU runs every branch at full resolution,
fuses with ``softmax`` over the stacked pooled descriptors, and only then subsamples for a stride. It takes the
module's generalisation to ``c1 != c2`` and stride ``s`` (odd ``k`` with autopad), with the widths recomputed here
from the rules the module documents. Parameters carry the module's names and shapes (the GN affine, (1, c1, 1, 1) in
the module, is flattened on load), so ``load_state_dict`` moves weights between the two (and fails loudly if the two
disagree on a width).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _divisor_at_most(n, limit):
    return [q for q in range(1, n + 1) if n % q == 0 and q <= limit][-1]


class ScConvRef(nn.Module):
    """SRU -> CRU -> BN -> SiLU, unoptimised."""

    def __init__(self, c1, c2, k=3, s=1, alpha=0.5, squeeze=2, group_size=2, gate_threshold=0.5):
        super().__init__()
        assert k % 2 == 1, "the reference samples the kxk window centres, which needs an odd k"
        self.k, self.s, self.t = k, s, gate_threshold
        self.gn = nn.GroupNorm(_divisor_at_most(c1, min(16, c1 // 2)), c1)  # >= 2 channels per group
        self.up = min(max(int(alpha * c1 + 0.5), 1), c1 - 1)
        m = min(c1, c2)
        mu = min(max(int(alpha * m + 0.5), 1), m - 1)
        su, sl = max(mu // squeeze, 1), min(max((m - mu) // squeeze, 1), c2 - 1)
        self.squeeze1 = nn.Conv2d(self.up, su, 1, bias=False)
        self.squeeze2 = nn.Conv2d(c1 - self.up, sl, 1, bias=False)
        groups = _divisor_at_most(math.gcd(su, c2), group_size)
        self.gwc = nn.Conv2d(su, c2, k, 1, k // 2, groups=groups, bias=False) if k > 1 else None
        self.pwc1 = nn.Conv2d(su, c2, 1, bias=False)
        self.pwc2 = nn.Conv2d(sl, c2 - sl, 1, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Flatten the module's (1, c1, 1, 1) GN affine to nn.GroupNorm's (c1,), then load."""
        for name in ("gn.weight", "gn.bias"):
            if prefix + name in state_dict:
                state_dict[prefix + name] = state_dict[prefix + name].flatten()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def sru(self, x):
        gamma = self.gn.weight
        w = (gamma / gamma.sum()).view(1, -1, 1, 1)
        weights = torch.sigmoid(self.gn(x) * w)
        w1 = torch.where(weights >= self.t, torch.ones_like(weights), weights)
        w2 = torch.where(weights >= self.t, torch.zeros_like(weights), weights)
        x1, x2 = w1 * x, w2 * x
        c = x.shape[1]
        x11, x12 = torch.split(x1, [c - c // 2, c // 2], dim=1)
        x21, x22 = torch.split(x2, [c // 2, c - c // 2], dim=1)
        return torch.cat([x11 + x22, x12 + x21], dim=1)

    def cru(self, x):
        upper, lower = torch.split(x, [self.up, x.shape[1] - self.up], dim=1)
        upper, lower = self.squeeze1(upper), self.squeeze2(lower)
        y1 = self.pwc1(upper) if self.gwc is None else self.gwc(upper) + self.pwc1(upper)
        y2 = torch.cat([self.pwc2(lower), lower], dim=1)
        y1, y2 = y1[..., :: self.s, :: self.s], y2[..., :: self.s, :: self.s]  # stride: keep the window centres
        s = torch.stack([F.adaptive_avg_pool2d(y1, 1), F.adaptive_avg_pool2d(y2, 1)])
        beta = torch.softmax(s, dim=0)
        return beta[0] * y1 + beta[1] * y2

    def forward(self, x):
        return self.act(self.bn(self.cru(self.sru(x))))
