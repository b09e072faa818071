"""DySnakeConv's math: the snake coordinates (offsets accumulated from the kernel's centre along x and along y,
scaled by the extension scope, clamped to the map) and their bilinear sampling in a naive loop written in the test,
the fork's fusion, and the partial warm start. Generic checks (shapes, ONNX, trace, autocast, fuse, ...) are in
test_contract.py, bad arguments in test_bad_input.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from module_checks import bn_eval, norm_rel_err, randomize_, rel_err
from ultralytics.nn.modules import Conv

from yolo_convplug.modules.dysnake import DySnakeConv, snake_offsets


def test_snake_offsets_accumulate_from_the_centre():
    swing = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0]).view(1, 5, 1, 1)
    assert snake_offsets(swing).flatten().tolist() == [3.0, 2.0, 0.0, 8.0, 24.0]


def bilinear_clamped(img: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """img (C, H, W) at (y, x) clamped into the map, interpolated from its four neighbours."""
    h, w = img.shape[-2:]
    y, x = min(max(y, 0.0), h - 1.0), min(max(x, 0.0), w - 1.0)
    y0, x0 = math.floor(y), math.floor(x)
    out = torch.zeros(img.shape[0], dtype=img.dtype)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            if yy < h and xx < w:
                out += (1 - abs(y - yy)) * (1 - abs(x - xx)) * img[:, yy, xx]
    return out


def snake_reference(m: DySnakeConv, x: torch.Tensor, axis: str) -> torch.Tensor:
    """One snake's conv output before GroupNorm (eval), point by point: point n = K//2 + t sits at t pixels from
    the centre along ``axis`` and at the running sum of the swings from the centre to it across ``axis``."""
    swing = torch.tanh(bn_eval(F.conv2d(x, m.offset.weight, m.offset.bias, m.stride, 1), m.offset_bn))
    k, c = m.kernel_points, m.kernel_points // 2
    conv = m.snake_x if axis == "x" else m.snake_y
    weight = conv.weight.flatten(2)  # (c2, c1, K)
    b, _, h, w = swing.shape
    out = torch.zeros(b, weight.shape[0], h, w)
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                own = swing[bi, :k, i, j] if axis == "x" else swing[bi, k:, i, j]
                for n in range(k):
                    steps = range(n, c) if n < c else range(c + 1, n + 1)
                    across = m.extend_scope * sum(own[t].item() for t in steps)
                    if axis == "x":
                        v = bilinear_clamped(x[bi], m.stride * i + across, m.stride * j + n - c)
                    else:
                        v = bilinear_clamped(x[bi], m.stride * i + n - c, m.stride * j + across)
                    out[bi, :, i, j] += weight[:, :, n] @ v
                out[bi, :, i, j] += conv.bias
    return out


def dysnake_reference(m: DySnakeConv, x: torch.Tensor) -> torch.Tensor:
    """The fork's DySnakeConv and its 1x1 Conv: cat[Conv, act(GN(snake x)), act(GN(snake y))] -> Conv(3 c2, c2, 1)."""
    sx = m.act(m.norm_x(snake_reference(m, x, "x")))
    sy = m.act(m.norm_y(snake_reference(m, x, "y")))
    return m.project(torch.cat((m.standard(x), sx, sy), 1))


@pytest.mark.parametrize(("c1", "c2", "k", "s", "scope"), [(3, 4, 3, 1, 1.0), (3, 8, 5, 2, 1.0), (2, 4, 3, 1, 2.5)])
def test_equals_naive_snake_sampling(c1, c2, k, s, scope):
    """Swings of up to a pixel a point (points reach past the border and get clamped), odd maps, strides."""
    m = randomize_(DySnakeConv(c1, c2, k, s, extend_scope=scope)).eval()
    with torch.no_grad():
        m.offset.weight.normal_(0, 0.5)
        x = torch.randn(2, c1, 6, 7)
        y, ref = m(x), dysnake_reference(m, x)
    assert y.shape == ref.shape == (2, c2, -(-6 // s), -(-7 // s))
    assert rel_err(y, ref) < 1e-5


def test_partial_conversion_is_the_stock_conv_through_the_activation():
    """Standard branch = the stock Conv, fusion = identity on its channels: act(stock(x)), whatever the snakes do."""
    stock = randomize_(Conv(8, 16, 3, 2), seed=2).eval()
    m = randomize_(DySnakeConv(8, 16, 3, 2), seed=3)
    assert m.convert_from(stock).startswith("partial")
    assert DySnakeConv.conversion_error is None
    x = torch.randn(2, 8, 9, 11)
    with torch.no_grad():
        assert norm_rel_err(m.eval()(x), F.silu(stock(x))) < 1e-6
