"""Naive DSConv reference, written independently of ``yolo_convplug.modules.dsconv``.

DSConv (Gennari do Nascimento et al., ICCV 2019, arXiv:1901.01928) quantised block by block in a Python loop, as the
authors' ``DSConvEngine.tensor_to_block`` walks blocks: per block of ``block_size`` input channels (the last one
shorter), per output channel and kernel position, the weight of largest magnitude is scaled onto ``-2^(bits-1)``, the
rest rounded and clamped to ``bits``-bit integers, and the KDS scale ``alpha = <w, q> / <q, q>`` fits the block by
least squares. The kernel is rebuilt on every forward (no cache). Parameters carry the module's names and shapes,
so ``load_state_dict`` moves weights between the two.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def quantize_blocks(weight, bits, block_size):
    """Return ``(q, alpha)``: integer-valued float kernel like ``weight`` and one scale per block (c2, nb, k, k)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    n_blocks = math.ceil(weight.shape[1] / block_size)
    q = torch.empty_like(weight)
    alpha = weight.new_empty(weight.shape[0], n_blocks, *weight.shape[2:])
    for b in range(n_blocks):
        block = weight[:, b * block_size : (b + 1) * block_size]
        index = block.abs().argmax(dim=1, keepdim=True)
        extreme = block.gather(1, index)  # the signed weight of largest magnitude
        step = extreme / qmin
        step[step == 0] = 1.0
        qb = torch.clamp(torch.round(block / step), qmin, qmax)
        denominator = (qb * qb).sum(1)
        denominator[denominator == 0] = 1.0
        q[:, b * block_size : (b + 1) * block_size] = qb
        alpha[:, b] = (block * qb).sum(1) / denominator
    return q, alpha


class DSConvNaive(nn.Module):
    """DSConv with the kernel dequantised on every forward, straight-through gradient to the shadow weights."""

    def __init__(self, c1, c2, k=3, s=1, bits=4, block_size=32, kds_bias=False, cds=False):
        super().__init__()
        self.bits, self.block_size = bits, block_size
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        n_blocks = math.ceil(c1 / block_size)
        self.kds_bias = nn.Parameter(torch.zeros(c2, n_blocks, k, k)) if kds_bias else None
        self.cds_weight = nn.Parameter(torch.ones(c2)) if cds else None
        self.cds_bias = nn.Parameter(torch.zeros(c2)) if cds else None
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def dequantized_weight(self):
        w = self.conv.weight
        q, alpha = quantize_blocks(w.detach(), self.bits, self.block_size)
        shift = torch.zeros_like(alpha) if self.kds_bias is None else self.kds_bias
        blocks = torch.arange(w.shape[1], device=w.device) // self.block_size  # block index of each input channel
        kernel = alpha[:, blocks] * q + shift[:, blocks] + (w - w.detach())  # straight-through: adds 0, grad 1
        return kernel if self.cds_weight is None else kernel * self.cds_weight.view(-1, 1, 1, 1)

    def forward(self, x):
        return self.act(self.bn(self.conv._conv_forward(x, self.dequantized_weight(), self.cds_bias)))
