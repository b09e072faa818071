"""Dynamic Snake Convolution, in the form YOLO uses it: a standard convolution and two snake convolutions (along x and
along y) fused by a 1x1 convolution.

Qi, He, Qi, Zhang, Yang, "Dynamic Snake Convolution based on Topological Geometric Constraints for Tubular Structure
Segmentation", ICCV 2023, arXiv:2307.08388.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from ultralytics.nn.modules.conv import Conv
from ultralytics.utils.torch_utils import fuse_conv_and_bn

from ..registry import ConversionError, register
from ._stock import copy_bn, stock_conv_bn
from ._utils import check_conv_args, fuse_convs, require, require_centred_kernel, require_number, resolve_act
from .akconv import sample_bilinear


def snake_offsets(swing: torch.Tensor) -> torch.Tensor:
    """Cumulative offsets along a kernel of ``K`` points from its centre: (B, K, h, w) -> (B, K, h, w).

    Point ``c = K // 2`` stays at 0; point ``c + m`` is point ``c + m - 1`` plus its own swing, point ``c - m`` is
    point ``c - m + 1`` plus its own: each point moves at most one swing from its neighbour, so the kernel stays a
    connected curve (the paper's "offset is an iterative process").
    """
    c = swing.shape[1] // 2
    before = swing[:, :c].flip(1).cumsum(1).flip(1)
    return torch.cat((before, torch.zeros_like(swing[:, c : c + 1]), swing[:, c + 1 :].cumsum(1)), 1)


def _dysnake_macs(m, x, y):
    """thop rule for the bilinear sampling of both snakes (4 MACs per sampled value, ``K`` per output position and
    input channel each); every convolution is a module that thop counts itself."""
    m.total_ops += 2 * 4 * y[:, 0].numel() * m.kernel_points * m.snake_x.in_channels


@register(role="conv", macs=_dysnake_macs, paper="Dynamic Snake Convolution, Qi, He, Qi, Zhang, Yang, ICCV 2023")
class DySnakeConv(nn.Module):
    """``Conv(3 c2, c2, 1)(cat[Conv(c1, c2, k, s)(x), snake_x(x), snake_y(x)])``: the YOLO forks' DySnakeConv and
    the 1x1 Conv they put after it, as one conv-role layer (``c1 -> c2``, stride ``s``).

    Each snake has ``K = k`` points on a line through the output pixel ``(s i, s j)``: ``snake_x`` along x (the
    paper's morph 0: columns ``s j + n - K // 2``, rows swinging), ``snake_y`` along y (morph 1, columns swinging).
    The swings are ``tanh(BN(conv3x3(x)))`` (stride ``s``; ``K`` channels for each snake), accumulated from the
    centre (``snake_offsets``) and scaled by ``extend_scope``. Coordinates are clamped to the map and sampled
    bilinearly (the official code's border handling); the ``K`` samples are stacked along the snake's axis and a
    ``(K, 1)`` (``(1, K)``) convolution with stride ``K`` combines them, then GroupNorm (``c2 // 4`` groups) and the
    activation, as in the official ``DSConv``. The official code computes ``2 K`` offsets per snake and uses
    ``K`` of them; here one offset convolution computes just the ``K + K`` used.

    ``convert_from`` a stock ``Conv`` is partial (``conversion_error = None``): the standard branch takes the stock
    layer and the 1x1 fusion passes it through (identity on its channels, zero on the snakes', BN neutral), so the
    layer computes ``act(stock(x))``: the stock features once more through the activation, the snakes connected
    but silent. That is the nearest a Conv gets (the stock output already went through the activation), and the
    calibrated warm start then fits the rest. ``fuse()`` folds every BN; the snakes' GroupNorms stay.
    """

    conversion_error = None

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, d=1, act=True, extend_scope=1.0):
        """Build the layer; see the class docstring. ``k`` odd (the snakes' length), ``p`` 'same', ``g = d = 1``;
        ``c2 >= 4`` and divisible by ``c2 // 4`` (the snakes' GroupNorm)."""
        super().__init__()
        name = type(self).__name__
        check_conv_args(name, c1, c2, k, s, p, g, d)
        require_centred_kernel(name, k, p, g, d, "the snakes have no groups", "the snakes replace dilation")
        require(c2 >= 4 and c2 % (c2 // 4) == 0, name, "c2", c2,
                "the snakes' GroupNorm has c2 // 4 groups: use c2 >= 4 divisible by c2 // 4 (any multiple of 4 works)")
        require_number(name, "extend_scope", extend_scope, 0, float("inf"), "use a number > 0 (the paper's 1)", True)
        self.kernel_points, self.stride, self.extend_scope = k, s, float(extend_scope)
        self.standard = Conv(c1, c2, k, s, act=act)
        self.offset = nn.Conv2d(c1, 2 * k, 3, s, 1)
        self.offset_bn = nn.BatchNorm2d(2 * k)
        self.snake_x = nn.Conv2d(c1, c2, (k, 1), (k, 1))
        self.snake_y = nn.Conv2d(c1, c2, (1, k), (1, k))
        self.norm_x, self.norm_y = nn.GroupNorm(c2 // 4, c2), nn.GroupNorm(c2 // 4, c2)
        self.act = resolve_act(act)
        self.project = Conv(3 * c2, c2, 1, act=act)

    def snake_samples(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two snakes' samples, float32: along x stacked on rows (B, c1, h K, w), along y on columns
        (B, c1, h, w K). Offsets and sampling run in float32 under autocast (half-precision coordinates lose pixels,
        the offset convolution's weight gradient overflows float16)."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            swing = self.offset(x.to(self.offset.weight.dtype))
            if hasattr(self, "offset_bn"):
                swing = self.offset_bn(swing)
            swing = swing.float().tanh()
            b, k, h, w = swing.shape[0], self.kernel_points, swing.shape[2], swing.shape[3]
            span = torch.arange(k, device=x.device, dtype=torch.float32).view(1, k, 1, 1) - k // 2
            rows = torch.arange(h, device=x.device, dtype=torch.float32).view(1, 1, -1, 1) * self.stride
            cols = torch.arange(w, device=x.device, dtype=torch.float32).view(1, 1, 1, -1) * self.stride
            height, width = x.shape[2] - 1, x.shape[3] - 1
            # along x: columns fixed on the line, rows swing; (B, K, h, w) -> (B, h K, w)
            y_rows = (rows + self.extend_scope * snake_offsets(swing[:, :k])).clamp(0, height)
            y_cols = (cols + span).clamp(0, width).expand(b, k, h, w)
            along_x = sample_bilinear(x, *(t.transpose(1, 2).reshape(b, h * k, w) for t in (y_rows, y_cols)))
            # along y: rows fixed on the line, columns swing; (B, K, h, w) -> (B, h, w K)
            x_rows = (rows + span).clamp(0, height).expand(b, k, h, w)
            x_cols = (cols + self.extend_scope * snake_offsets(swing[:, k:])).clamp(0, width)
            along_y = sample_bilinear(x, *(t.permute(0, 2, 3, 1).reshape(b, h, w * k) for t in (x_rows, x_cols)))
        return along_x, along_y

    def forward(self, x):
        """Standard conv, both snakes (GroupNorm, activation), concatenated and fused by the 1x1 Conv."""
        along_x, along_y = self.snake_samples(x)
        snake_x = self.act(self.norm_x(self.snake_x(along_x.to(x.dtype))))
        snake_y = self.act(self.norm_y(self.snake_y(along_y.to(x.dtype))))
        return self.project(torch.cat((self.standard(x), snake_x, snake_y), 1))

    def fuse(self):
        """Fold the BNs of the standard conv, the 1x1 fusion and the offsets into their convolutions (exact in
        eval); the snakes' GroupNorms use per-image statistics and stay."""
        if hasattr(self, "offset_bn"):
            fuse_convs(self)
            self.offset = fuse_conv_and_bn(self.offset, self.offset_bn)
            del self.offset_bn
        return self

    @torch.no_grad()
    def convert_from(self, stock: nn.Module) -> str:
        """Partial warm start (see the class docstring): standard branch = the stock ``Conv``, the 1x1 fusion passes
        it through. Raises ``ConversionError`` for another geometry or activation, or a fused ``Conv``."""
        if not hasattr(self.standard, "bn"):
            raise ConversionError("this DySnakeConv is fused; convert before fusing")
        own = self.standard.conv
        conv, bn = stock_conv_bn("DySnakeConv", stock, own, self.act)
        own.weight.copy_(conv.weight)
        copy_bn(self.standard.bn, bn)
        c2 = own.out_channels
        weight = self.project.conv.weight
        weight.zero_()
        weight[:, :c2, 0, 0] = torch.eye(c2)
        neutral = self.project.bn
        neutral.reset_parameters()
        neutral.running_var.fill_(1 - neutral.eps)  # BN(z) = z exactly
        return "partial: standard branch = the stock Conv, 1x1 fusion passes it through (snakes silent), to calibrate"
