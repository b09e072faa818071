"""FasterNet partial convolution, its block, and a C2f built from those blocks.

Chen et al., "Run, Don't Walk: Chasing Higher FLOPS for Faster Neural Networks", CVPR 2023, arXiv:2303.03667.

A partial convolution (PConv) convolves only the first ``c_p = c // n_div`` channels and passes the rest through,
cutting FLOPs to ``(c_p / c)^2`` and memory access to about ``c_p / c`` of a full k x k conv. A FasterNet block
follows it with an inverted-bottleneck MLP of two 1x1 convs, and ``C2f_Faster`` is Ultralytics' ``C2f`` with
FasterNet blocks in place of its Bottlenecks.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from ultralytics.nn.modules.block import C2f
from ultralytics.nn.modules.conv import Conv

from ..registry import ConversionError, register
from ._utils import fuse_convs, require, require_int, resolve_act


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., ECCV 2016): in training, zero a whole sample's branch with probability ``p``
    and scale the kept ones by ``1 / (1 - p)``; identity in eval."""

    def __init__(self, p: float = 0.0):
        """Initialize with drop probability ``p`` in [0, 1)."""
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop whole samples of ``x`` in training."""
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep.div_(1.0 - self.p)


@register(role="conv", paper="FasterNet, Chen, Kao, He, Zhuo, Wen, Lee, Chan, CVPR 2023")
class PConv(nn.Module):
    """Partial convolution (FasterNet, CVPR 2023, Sec. 3.1).

    ``y = cat(W * x[:, :c_p], x[:, c_p:])`` with ``c_p = c1 // n_div`` and ``W`` a plain k x k, stride-1,
    "same"-padded conv without bias, BN or activation; the other ``c1 - c_p`` channels pass through unchanged.

    PConv keeps the channel count and the resolution, so ``c2`` must equal ``c1`` (or be None) and ``s`` must be 1.
    One split/cat path serves training and inference: it never writes into the input (the paper's in-place
    "slicing" forward would corrupt a residual taken from the same tensor), and its backward is one ``cat`` rather
    than a ``clone()`` plus slice assignment.

    Args:
        c1 (int): Input channels.
        c2 (int | None): Output channels, must equal c1 (None means c1).
        k (int): Odd kernel size of the partial conv.
        s (int): Stride, must be 1.
        n_div (int): The convolved part is ``c1 // n_div`` channels; ``1 <= n_div <= c1``.
    """

    def __init__(self, c1: int, c2: int | None = None, k: int = 3, s: int = 1, n_div: int = 4):
        """Initialize the partial conv over the first ``c1 // n_div`` channels."""
        super().__init__()
        require_int("PConv", "c1", c1)
        c2 = c1 if c2 is None else c2
        require(c2 == c1, "PConv", "c2", c2, f"PConv keeps the channel count: use c2={c1} (= c1) or None")
        require_int("PConv", "k", k)
        require(k % 2 == 1, "PConv", "k", k, "the pass-through part keeps the resolution: use an odd k such as 3")
        require(s == 1, "PConv", "s", s, "PConv keeps the resolution: use s=1 and downsample with a Conv before it")
        require_int("PConv", "n_div", n_div)
        require(n_div <= c1, "PConv", "n_div", n_div, f"at least one channel must be convolved: use n_div <= c1={c1}")
        self.cp = c1 // n_div
        self.splits = (self.cp, c1 - self.cp)
        self.conv = nn.Conv2d(self.cp, self.cp, k, 1, k // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve the first ``cp`` channels and concatenate the untouched rest."""
        x1, x2 = x.split(self.splits, 1)  # backward is one cat, not two zero-filled slices
        return torch.cat((self.conv(x1), x2), 1)


@register(role="conv", paper="FasterNet, Chen, Kao, He, Zhuo, Wen, Lee, Chan, CVPR 2023")
class FasterBlock(nn.Module):
    """FasterNet block (FasterNet, CVPR 2023, Fig. 4).

    ``y = x + DropPath(W_2 * act(BN(W_1 * PConv(x))))`` where ``W_1`` is a 1x1 conv to ``mlp_ratio * c2``
    channels and ``W_2`` a 1x1 conv back to ``c2`` without BN or activation. The residual is FasterNet's (paper
    Fig. 4, the official MLPBlock always adds it), and ``C2f_Faster`` always builds its blocks with it; standalone,
    ``shortcut=False`` or ``c1 != c2`` leaves ``y`` the branch alone.

    ``fuse()`` folds the BN into ``W_1`` (an Ultralytics ``Conv``, switched to its ``forward_fuse``), which is exact.

    Args:
        c1 (int): Input channels.
        c2 (int): Output channels.
        n_div (int): PConv convolves ``c1 // n_div`` channels.
        mlp_ratio (float): Hidden width of the MLP relative to c2.
        drop_path (float): Stochastic-depth probability of the branch in training, in [0, 1).
        act (bool | nn.Module): Activation after the BN, Ultralytics ``Conv`` convention.
        shortcut (bool): Add the input to the output when c1 == c2 (True in FasterNet and in C2f_Faster).
    """

    def __init__(
        self,
        c1: int,
        c2: int,
        n_div: int = 4,
        mlp_ratio: float = 2,
        drop_path: float = 0.0,
        act=True,
        shortcut: bool = True,
    ):
        """Initialize PConv, the two-conv MLP and the optional residual."""
        super().__init__()
        require_int("FasterBlock", "c2", c2)
        require(
            isinstance(mlp_ratio, (int, float)) and int(c2 * mlp_ratio) >= 1,
            "FasterBlock",
            "mlp_ratio",
            mlp_ratio,
            f"use a number > 0 with int(c2 * mlp_ratio) >= 1 (c2={c2}), e.g. 2",
        )
        require(
            isinstance(drop_path, (int, float)) and 0.0 <= drop_path < 1.0,
            "FasterBlock",
            "drop_path",
            drop_path,
            "use a probability in [0, 1), e.g. 0.0 or 0.1",
        )
        c_ = int(c2 * mlp_ratio)
        self.pconv = PConv(c1, c1, 3, 1, n_div)
        self.cv1 = Conv(c1, c_, 1, 1, act=resolve_act(act))
        self.cv2 = nn.Conv2d(c_, c2, 1, bias=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.add = bool(shortcut) and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply PConv, the MLP and the residual."""
        y = self.drop_path(self.cv2(self.cv1(self.pconv(x))))
        return x + y if self.add else y

    def fuse(self) -> FasterBlock:
        """Fold the BN into the expand conv for inference."""
        return fuse_convs(self)


@register(role="repeat", paper="FasterNet, Chen, Kao, He, Zhuo, Wen, Lee, Chan, CVPR 2023")
class C2f_Faster(C2f):
    """Ultralytics ``C2f`` (CSP bottleneck, two convs) with FasterNet blocks instead of Bottlenecks.

    ``y = cv2(cat(a, b, m_1(b), m_2(m_1(b)), ...))`` with ``(a, b) = chunk(cv1(x), 2)`` and ``m_i`` FasterBlocks
    of width ``c = int(c2 * e)``, each with its residual ``m_i(z) = z + branch(z)`` (Chen et al., CVPR 2023; C2f
    from Ultralytics YOLOv8). ``forward`` and ``forward_split`` are C2f's own, so Ultralytics' exporter swap gives
    the same output.

    Warm start (``convert_from``) from an Ultralytics ``C2f``/``C3k2`` of the same c1, c2, e and n copies cv1 and
    cv2 and zeroes every FasterBlock's last projection ``W_2`` (the usual zero-init of a residual branch), so the
    layer starts as ``cv2(cat(a, b, b, ..., b))``: the stock layer with identity bottlenecks.

    Args:
        c1 (int): Input channels.
        c2 (int): Output channels.
        n (int): Number of FasterBlocks.
        shortcut (bool): Kept for C2f's signature (YAML rows and swaps carry it over); ignored: a FasterNet
            block always adds its residual (paper Fig. 4, the official MLPBlock), whatever C2f's flag says.
        g (int): Kept for the C2f signature; FasterBlocks have no grouped conv, so it must be 1.
        e (float): Hidden width ratio.
        n_div (int): PConv split ratio of every FasterBlock.
        mlp_ratio (float): MLP width ratio of every FasterBlock.
        drop_path (float): Stochastic-depth probability of every FasterBlock.
    """

    conversion_error = None  # approximate: identity FasterBlocks stand in for the stock bottlenecks
    calibration_steps = 200  # its fit to a trained C2f is still falling at 100 steps (README, warm-start table)

    def __init__(
        self,
        c1: int,
        c2: int,
        n: int = 1,
        shortcut: bool = False,
        g: int = 1,
        e: float = 0.5,
        n_div: int = 4,
        mlp_ratio: float = 2,
        drop_path: float = 0.0,
    ):
        """Initialize C2f's cv1/cv2 and ``n`` FasterBlocks."""
        require_int("C2f_Faster", "c1", c1)
        require_int("C2f_Faster", "c2", c2)
        require_int("C2f_Faster", "n", n, 0)
        require(g == 1, "C2f_Faster", "g", g, "FasterBlocks have no grouped conv: use g=1")
        require(
            isinstance(e, (int, float)) and int(c2 * e) >= 1,
            "C2f_Faster",
            "e",
            e,
            f"use a ratio > 0 with int(c2 * e) >= 1 (c2={c2}), e.g. 0.5",
        )
        super().__init__(c1, c2, 0, shortcut, g, e)  # n=0: no Bottlenecks are built, cv2 is rebuilt below
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(
            FasterBlock(self.c, self.c, n_div, mlp_ratio, drop_path) for _ in range(n)  # residual always (Fig. 4)
        )

    def fuse(self) -> C2f_Faster:
        """Fold every BN (cv1, cv2 and the FasterBlocks' expand convs) for inference."""
        return fuse_convs(self)

    @torch.no_grad()
    def convert_from(self, stock: nn.Module) -> str:
        """Start from a stock ``C2f``/``C3k2``: its cv1 and cv2, and FasterBlocks that start as the identity.

        Raises:
            ConversionError: the stock layer's cv1/cv2 shapes differ (another c1, c2, e or number of blocks n, which
                sets cv2's input width ``(2 + n) * c``) or its convs are already fused (no BN to copy).
        """
        for name in ("cv1", "cv2"):
            ours, theirs = getattr(self, name), getattr(stock, name)
            if not hasattr(theirs, "bn") or not hasattr(ours, "bn"):
                raise ConversionError(f"{name} of one side is fused (no BN); convert before fusing")
            shape, stock_shape = tuple(ours.conv.weight.shape), tuple(theirs.conv.weight.shape)
            if shape != stock_shape:
                raise ConversionError(
                    f"{name} kernel {stock_shape} (stock, n={len(stock.m)}) != {shape} (n={len(self.m)}); "
                    "c1, c2, e and n must match"
                )
        self.cv1.load_state_dict(stock.cv1.state_dict())
        self.cv2.load_state_dict(stock.cv2.state_dict())
        for block in self.m:
            nn.init.zeros_(block.cv2.weight)  # branch = 0: m_i(z) = z
        n = len(self.m)
        return f"cv1/cv2 copied, {n} FasterBlock{'s start' if n != 1 else ' starts'} as identity"
