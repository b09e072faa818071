"""AKConv: a convolution over any number of sampling points, whose sampled shape is learned.

Zhang, Song, Yu, Wang, Li, Li, Yu, "AKConv: Convolutional Kernel with Arbitrary Sampled Shapes and Arbitrary Number
of Parameters", arXiv:2311.11587, 2023.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import ConversionError, register
from ._stock import copy_bn, stock_conv_bn
from ._utils import check_conv_args, fuse_own_bn, require, require_int, resolve_act


def initial_shape(num_points: int) -> torch.Tensor:
    """The paper's initial sampled shape as (row, column) offsets, (N, 2), centred on the output pixel.

    ``b = round(sqrt(N))`` columns: ``N // b`` full rows, then a last row of the ``N % b`` remaining points, all in
    row-major order; then shifted by ``(rows // 2, b // 2)`` so the grid sits around the pixel as a ``Conv``'s
    'same'-padded kernel does (the official code anchors it at the top-left). ``N = k * k`` gives the ``k x k``
    grid in the order of a ``Conv`` kernel's taps.
    """
    base = round(math.sqrt(num_points))
    rows = [divmod(n, base) for n in range(num_points)]
    total_rows = rows[-1][0] + 1
    return torch.tensor(rows, dtype=torch.float32) - torch.tensor([total_rows // 2, base // 2], dtype=torch.float32)


def sample_bilinear(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) sampled bilinearly at pixel coordinates ``rows``/``cols`` (B, h, w), zero outside the map."""
    h, w = x.shape[-2:]
    grid = torch.stack(((2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1), -1)  # align_corners=False normalisation
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _akconv_macs(m, x, y):
    """thop rule for the bilinear sampling thop does not see: 4 MACs per sampled value (``N`` per output position
    and input channel). The offset and point convolutions are modules that thop counts itself."""
    m.total_ops += 4 * y[:, 0].numel() * m.num_points * m.conv.in_channels


@register(role="conv", macs=_akconv_macs, paper="AKConv, Zhang, Song et al., arXiv:2311.11587, 2023")
class AKConv(nn.Module):
    """AKConv with ``N`` sampling points, followed by BatchNorm and activation.

    At output pixel ``(i, j)`` the ``n``-th point is sampled at ``(s i, s j) + p_n + offset_n(i, j)``, where ``p_n``
    is the paper's initial shape (``initial_shape``: a grid of ``round(sqrt(N))`` columns, the remainder in a last
    row) and the offsets (row, column per point) come from a 3x3 convolution of stride ``s`` that starts at zero,
    as in the official code (which also puts the stride there). The ``N`` bilinear samples of each input channel
    are stacked along the row axis, ``(B, c1, h N, w)``, and a convolution with kernel ``(N, 1)`` and stride
    ``(N, 1)`` (groups ``g``) combines them, then BN and activation: the official ``AKConv``.

    Deviations from the official code, so that ``N = k * k`` points with zero offsets compute exactly a 'same'
    ``Conv(c1, c2, k, s)`` (and ``convert_from`` one is exact): the initial shape is centred on the pixel
    instead of anchored at its top-left, and points outside the map read zero (as in deformable convolution)
    instead of being clamped to the border. The output has ``ceil(H / s) x ceil(W / s)`` pixels.

    The offsets and the sampling run in float32 under autocast: half-precision coordinates lose whole pixels on
    large maps, and the offset convolution's weight gradient (a sum over every pixel) overflows float16. The
    sampling is ``grid_sample`` (exports to ONNX ``GridSample``, opset 16 and later). A
    torchvision ``deform_conv2d`` with a ``(1, N)`` kernel would compute the same (its offsets moving each tap of
    a row kernel to ``p_n``), but exports only at opset 19.
    """

    conversion_error = 1e-5

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, d=1, act=True, num_param=None):
        """Build the layer; see the class docstring. ``num_param`` (default ``k * k``) is the number of points;
        ``k`` must be odd, ``p`` 'same' and ``d = 1`` (the sampled shape replaces kernel size and dilation)."""
        super().__init__()
        name = type(self).__name__
        check_conv_args(name, c1, c2, k, s, p, g, d)
        require(k % 2 == 1, name, "k", k, "AKConv needs an odd kernel size (1, 3, 5, ...) for its output grid")
        require(p is None or p == k // 2, name, "p", p, f"leave p=None ('same' padding {k // 2})")
        require(d == 1, name, "d", d, "AKConv learns its sampled shape: use d=1")
        num_points = k * k if num_param is None else num_param
        require_int(name, "num_param", num_points)
        self.num_points, self.stride = num_points, s
        self.point_rows, self.point_cols = initial_shape(num_points).T.tolist()
        self.offset = nn.Conv2d(c1, 2 * num_points, 3, s, 1)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.conv = nn.Conv2d(c1, c2, (num_points, 1), (num_points, 1), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = resolve_act(act)

    def resample(self, x: torch.Tensor) -> torch.Tensor:
        """The ``N`` samples per output pixel stacked along rows: (B, c1, h N, w), float32 under autocast."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            offset = self.offset(x.to(self.offset.weight.dtype)).float()
            b, n, h, w = offset.shape[0], self.num_points, offset.shape[2], offset.shape[3]
            rows, cols = (torch.arange(size, device=x.device, dtype=torch.float32) * self.stride for size in (h, w))
            rows = rows.view(1, 1, -1, 1) + offset.new_tensor(self.point_rows).view(1, n, 1, 1) + offset[:, :n]
            cols = cols.view(1, 1, 1, -1) + offset.new_tensor(self.point_cols).view(1, n, 1, 1) + offset[:, n:]
            rows, cols = (t.transpose(1, 2).reshape(b, h * n, w) for t in (rows, cols))  # (B, N, h, w) -> (B, h N, w)
            return sample_bilinear(x, rows, cols)

    def forward(self, x):
        """Offsets, bilinear sampling, the ``(N, 1)`` point convolution, BatchNorm and activation."""
        return self.act(self.bn(self.conv(self.resample(x).to(x.dtype))))

    def forward_fuse(self, x):
        """Fused inference: BN folded into the point convolution."""
        return self.act(self.conv(self.resample(x).to(x.dtype)))

    def fuse(self):
        """Fold BN into the point convolution (exact in eval); the offsets still come from the input."""
        return fuse_own_bn(self)

    @torch.no_grad()
    def convert_from(self, stock: nn.Module) -> str:
        """Warm start from an Ultralytics ``Conv(c1, c2, k, s)`` with 'same' padding and ``N = k * k``: exactly its
        function (tap ``(u, v)`` is point ``u k + v``), offsets zero, BN copied. Raises ``ConversionError`` for
        another geometry, another number of points (the layer is then left to the calibrated warm start) or a
        fused ``Conv``."""
        k = math.isqrt(self.num_points)
        if k * k != self.num_points or k % 2 == 0:
            raise ConversionError(f"AKConv's num_param={self.num_points} points are not an odd k x k grid; no stock "
                                  "Conv computes its function")
        geometry = nn.Conv2d(self.conv.in_channels, self.conv.out_channels, k, self.stride, k // 2,
                             groups=self.conv.groups, bias=False, device="meta")
        conv, bn = stock_conv_bn("AKConv", stock, geometry, self.act)
        self.conv.weight.copy_(conv.weight.flatten(2).unsqueeze(-1))
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        copy_bn(self.bn, bn)
        return f"exact: the {k}x{k} kernel as {self.num_points} points at the initial shape, offsets zero, BN copied"
