"""Naive CondConv reference, written independently of ``yolo_convplug.modules.condconv``.

The per-sample Python loop of the blog article, corrected and written from the paper (Yang et al., NeurIPS 2019,
arXiv:1904.04971): for each sample pool, route ``r = sigmoid(R · dropout(GAP(x)) + b)``, mix the kernel
``sum_i r_i W_i`` expert by expert, convolve that one sample; then BN and SiLU over the batch. Parameters carry the
module's names and shapes, so ``load_state_dict`` moves weights between the two.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class CondConvLoop(nn.Module):
    """CondConv computed one sample at a time (the slow formulation the module replaces)."""

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, d=1, experts=8, dropout=0.2):
        super().__init__()
        self.stride, self.groups, self.dilation = s, g, d
        self.padding = (d * (k - 1) + 1) // 2 if p is None else p
        self.kernel_shape = (c2, c1 // g, k, k)
        self.weight = nn.Parameter(torch.empty(experts, c2 * (c1 // g) * k * k))
        for i in range(experts):
            nn.init.kaiming_uniform_(self.weight.data[i].view(self.kernel_shape), a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.routing = nn.Linear(c1, experts)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        outs = []
        for sample in x:
            sample = sample.unsqueeze(0)
            pooled = F.adaptive_avg_pool2d(sample, 1).flatten(1)
            r = torch.sigmoid(self.routing(self.dropout(pooled)))[0]
            kernel = sum(r[i] * self.weight[i].view(self.kernel_shape) for i in range(self.weight.shape[0]))
            outs.append(F.conv2d(sample, kernel, None, self.stride, self.padding, self.dilation, self.groups))
        return self.act(self.bn(torch.cat(outs)))
