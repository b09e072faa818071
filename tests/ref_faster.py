"""Naive FasterNet references, written independently of ``yolo_convplug.modules.faster``.

They follow the official FasterNet code's two PConv forwards (``forward_split_cat`` for training, ``forward_slicing``
for inference, the latter with its ``clone()`` so the input stays intact) and write the C2f structure out by hand
from plain ``nn.Conv2d``/``nn.BatchNorm2d``/``nn.SiLU`` (Chen et al., CVPR 2023; C2f from Ultralytics YOLOv8).
Parameters are registered in the same order and shapes as the module's, so ``copy_weights`` can load them.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class PConvSplitCat(nn.Module):
    """FasterNet PConv, training path: split the channels, convolve the first part, concatenate."""

    def __init__(self, dim: int, n_div: int = 4, k: int = 3):
        super().__init__()
        self.dim_conv = dim // n_div
        self.dim_untouched = dim - self.dim_conv
        self.conv = nn.Conv2d(self.dim_conv, self.dim_conv, k, 1, k // 2, bias=False)

    def forward(self, x):
        x1, x2 = torch.split(x, [self.dim_conv, self.dim_untouched], dim=1)
        return torch.cat((self.conv(x1), x2), 1)


class PConvSlicing(PConvSplitCat):
    """FasterNet PConv, inference path: overwrite the first channels of a copy of the input."""

    def forward(self, x):
        x = x.clone()
        x[:, : self.dim_conv] = self.conv(x[:, : self.dim_conv])
        return x


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias), BatchNorm2d, SiLU: what an Ultralytics ``Conv`` computes, spelled out."""

    def __init__(self, c1: int, c2: int, k: int = 1):
        super().__init__(nn.Conv2d(c1, c2, k, 1, k // 2, bias=False), nn.BatchNorm2d(c2), nn.SiLU())


class FasterNetBlock(nn.Module):
    """FasterNet block (official MLPBlock, paper Fig. 4): PConv, then 1x1 expand + BN + act, 1x1 project, and the
    residual, which FasterNet always adds."""

    def __init__(self, dim: int, n_div: int = 4, mlp_ratio: float = 2, pconv=PConvSplitCat):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.spatial_mixing = pconv(dim, n_div)
        self.mlp = nn.Sequential(ConvBNAct(dim, hidden), nn.Conv2d(hidden, dim, 1, bias=False))

    def forward(self, x):
        return x + self.mlp(self.spatial_mixing(x))


class ReferenceC2fFaster(nn.Module):
    """C2f with FasterNet blocks, written out: cv1, split in two halves, chained blocks, concatenation, cv2."""

    def __init__(self, c1: int, c2: int, n: int = 1, e: float = 0.5, pconv=PConvSplitCat):
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = ConvBNAct(c1, 2 * self.c)
        self.cv2 = ConvBNAct((2 + n) * self.c, c2)
        self.m = nn.ModuleList(FasterNetBlock(self.c, pconv=pconv) for _ in range(n))

    def forward(self, x):
        ys = list(torch.split(self.cv1(x), [self.c, self.c], 1))
        for block in self.m:
            ys.append(block(ys[-1]))
        return self.cv2(torch.cat(ys, 1))


def copy_weights(dst: nn.Module, src: nn.Module) -> nn.Module:
    """Load ``src``'s parameters and buffers into ``dst`` by registration order (shapes must agree)."""
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    assert [v.shape for v in src_sd.values()] == [v.shape for v in dst_sd.values()], "layouts differ"
    dst.load_state_dict(dict(zip(dst_sd.keys(), src_sd.values())))
    return dst
