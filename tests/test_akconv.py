"""AKConv's math: the paper's initial sampled shape, a naive bilinear-sampling loop written in the test for learned
offsets and any number of points, and the plain conv it equals with k*k points and zero offsets (exact warm start).
Generic checks (shapes, ONNX, trace, autocast, fuse, ...) are in test_contract.py, bad arguments in
test_bad_input.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from module_checks import assert_converts_exactly, bn_eval, random_stock_conv, randomize_, rel_err
from ultralytics.nn.modules import Conv

from yolo_convplug.modules.akconv import AKConv, initial_shape
from yolo_convplug.registry import ConversionError


def test_initial_shape_is_grid_rows_then_remainder():
    """N=5: round(sqrt(5)) = 2 columns, two full rows and one point left, centred by (3 // 2, 2 // 2)."""
    assert initial_shape(5).tolist() == [[-1, -1], [-1, 0], [0, -1], [0, 0], [1, -1]]
    assert initial_shape(9).tolist() == [[r, c] for r in (-1, 0, 1) for c in (-1, 0, 1)]
    assert initial_shape(1).tolist() == [[0, 0]]


def bilinear(img: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """img (C, H, W) at (y, x): the four neighbours' weighted sum, a neighbour outside the map counting zero."""
    h, w = img.shape[-2:]
    y0, x0 = math.floor(y), math.floor(x)
    out = torch.zeros(img.shape[0], dtype=img.dtype)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            if 0 <= yy < h and 0 <= xx < w:
                out += (1 - abs(y - yy)) * (1 - abs(x - xx)) * img[:, yy, xx]
    return out


def akconv_reference(m: AKConv, x: torch.Tensor) -> torch.Tensor:
    """Eval AKConv point by point: sample each point at (s i, s j) + p_n + offset_n, weight it by W[:, :, n]."""
    offset = F.conv2d(x, m.offset.weight, m.offset.bias, m.stride, 1)
    n_points, shape = m.num_points, initial_shape(m.num_points)
    weight, groups = m.conv.weight[..., 0], m.conv.groups  # (c2, c1 / g, N)
    c2, cg = weight.shape[:2]
    b, _, h, w = offset.shape
    z = torch.zeros(b, c2, h, w, dtype=x.dtype)
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                for n in range(n_points):
                    y = m.stride * i + shape[n, 0].item() + offset[bi, n, i, j].item()
                    xx = m.stride * j + shape[n, 1].item() + offset[bi, n_points + n, i, j].item()
                    v = bilinear(x[bi], y, xx)
                    for o in range(c2):
                        grp = o // (c2 // groups)
                        z[bi, o, i, j] += weight[o, :, n] @ v[grp * cg : (grp + 1) * cg]
    return m.act(bn_eval(z, m.bn))


@pytest.mark.parametrize(("c1", "c2", "k", "s", "g", "num_param"),
                         [(4, 6, 3, 1, 1, None), (4, 6, 3, 2, 1, 5), (4, 4, 3, 1, 2, 7), (3, 5, 1, 2, 1, 2)])
def test_equals_naive_bilinear_sampling(c1, c2, k, s, g, num_param):
    """Offsets of a few pixels (some points leave the map), odd map sizes, groups, strides, 1 to 9 points."""
    m = randomize_(AKConv(c1, c2, k, s, g=g, num_param=num_param)).eval()
    with torch.no_grad():
        m.offset.weight.normal_(0, 0.5)
        m.offset.bias.normal_(0, 1.0)
        x = torch.randn(2, c1, 5, 7)
        y, ref = m(x), akconv_reference(m, x)
    assert y.shape == ref.shape == (2, c2, -(-5 // s), -(-7 // s))
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize(("c1", "c2", "k", "s", "g"), [(8, 16, 3, 1, 1), (8, 16, 3, 2, 1), (8, 8, 5, 2, 4),
                                                       (8, 16, 1, 2, 1)])
@pytest.mark.parametrize("hw", [(1, 1), (7, 9), (8, 12)])
def test_k_squared_points_with_zero_offsets_equal_the_plain_conv(c1, c2, k, s, g, hw):
    m = randomize_(AKConv(c1, c2, k, s, g=g), seed=4)
    assert_converts_exactly(m, random_stock_conv(c1, c2, k, s, g=g), torch.randn(3, c1, *hw))


def test_other_numbers_of_points_have_no_conversion():
    with pytest.raises(ConversionError, match="num_param=5"):
        AKConv(8, 16, 3, 2, num_param=5).convert_from(Conv(8, 16, 3, 2))


def test_offsets_learn():
    """The zero-initialised offset conv gets a gradient in a fresh module (the sampled shape can move)."""
    m = AKConv(4, 8, 3, 1, num_param=5).train()
    y = m(torch.randn(2, 4, 6, 6))
    (y * torch.randn_like(y)).sum().backward()
    assert m.offset.weight.grad.abs().sum() > 0
