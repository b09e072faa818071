"""SPDConv's math: the paper's space-to-depth + stride-1 conv written out in the test, and the exact warm start from
a stock strided Conv on odd and even maps. Generic checks (shapes, ONNX, trace, autocast, ...): test_contract.py,
bad arguments: test_bad_input.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from module_checks import assert_converts_exactly, bn_eval, random_stock_conv, randomize_, rel_err
from ultralytics.nn.modules import Conv

from yolo_convplug.modules.spdconv import SPDConv
from yolo_convplug.registry import ConversionError


def space_to_depth(x: torch.Tensor, s: int) -> torch.Tensor:
    """Zero-pad bottom/right to a multiple of ``s``, then channel ``c * s * s + a * s + b`` = ``x[c, a::s, b::s]``."""
    h, w = x.shape[-2:]
    x = F.pad(x, (0, -w % s, 0, -h % s))
    parts = [x[:, c : c + 1, a::s, b::s] for c in range(x.shape[1]) for a in range(s) for b in range(s)]
    return torch.cat(parts, 1)


def spd_reference(m: SPDConv, x: torch.Tensor) -> torch.Tensor:
    """The paper's SPD-Conv in eval: space-to-depth, then the stride-1 'same' conv, BN, activation."""
    z = F.conv2d(space_to_depth(x, m.scale), m.conv.weight, None, 1, m.conv.padding, 1, m.conv.groups)
    return m.act(bn_eval(z, m.bn))


@pytest.mark.parametrize(("c1", "c2", "k", "s", "g"), [(8, 16, 3, 2, 1), (8, 16, 1, 2, 1), (6, 12, 5, 3, 1),
                                                       (8, 8, 3, 2, 4), (8, 16, 3, 1, 1)])
@pytest.mark.parametrize("hw", [(1, 1), (7, 10), (16, 13)])
def test_equals_space_to_depth_then_conv(c1, c2, k, s, g, hw):
    m = randomize_(SPDConv(c1, c2, k, s, g=g)).eval()
    x = torch.randn(2, c1, *hw)
    with torch.no_grad():
        y, ref = m(x), spd_reference(m, x)
    assert y.shape == ref.shape == (2, c2, -(-hw[0] // s), -(-hw[1] // s))
    assert rel_err(y, ref) < 1e-5


def test_stride_one_is_a_plain_conv():
    stock = randomize_(Conv(8, 16, 3, 1), seed=1).eval()
    m = SPDConv(8, 16, 3, 1)
    m.convert_from(stock)
    x = torch.randn(2, 8, 9, 11)
    with torch.no_grad():
        assert rel_err(m.eval()(x), stock(x)) < 1e-5


@pytest.mark.parametrize(("c1", "c2", "k", "s", "g", "d"),
                         [(8, 16, 3, 2, 1, 1), (8, 16, 1, 2, 1, 1), (8, 16, 5, 2, 1, 1), (8, 8, 3, 2, 2, 1),
                          (8, 16, 3, 2, 1, 2), (4, 8, 3, 3, 1, 1), (4, 8, 5, 3, 1, 3)])
@pytest.mark.parametrize("hw", [(7, 9), (8, 8), (13, 6), (1, 2)])
def test_conversion_from_strided_conv_is_exact(c1, c2, k, s, g, d, hw):
    """Odd and even maps: the converted SPDConv gives the strided Conv's output shape and values (1e-5)."""
    m = randomize_(SPDConv(c1, c2, k, s, g=g), seed=5)
    assert_converts_exactly(m, random_stock_conv(c1, c2, k, s, g=g, d=d), torch.randn(3, c1, *hw))


REFUSED = [((8, 16, 3, 2, None, 1, 3), "beyond"), ((8, 16, 3, 2, 0), r"p=\(0, 0\) vs \(1, 1\)"),
           ((8, 16, 3, 1), r"s=\(1, 1\) vs \(2, 2\)"), ((8, 16, 5, 2), r"k=\(5, 5\) vs \(3, 3\)")]


@pytest.mark.parametrize(("stock_args", "reason"), REFUSED)
def test_conversion_refuses_what_it_cannot_express(stock_args, reason):
    """A dilation-3 stock kernel reaches beyond the 3x3 SPD kernel at scale 2; unpadded or other-stride stock convs
    have another output grid; another kernel size is another architecture's layer."""
    with pytest.raises(ConversionError, match=reason):
        SPDConv(8, 16, 3, 2).convert_from(Conv(*stock_args))
