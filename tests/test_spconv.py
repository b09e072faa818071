"""SPConv's math against the official formulation written out in the test (split, group-wise + point-wise and
cheap 1x1 branches with their BNs, softmax over the branches' global averages), on odd and even maps and strides.
Generic checks (shapes, ONNX, trace, autocast, fuse, ...) are in test_contract.py, bad arguments in
test_bad_input.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from module_checks import bn_eval, randomize_, rel_err

from yolo_convplug.modules.spconv import SPConv


def pooled(x, s):
    """Mean of each s x s block (the last block of an odd map holds only the pixels inside it)."""
    if s == 1:
        return x
    h, w = x.shape[-2:]
    rows = [x[..., i : i + s, :].mean(-2) for i in range(0, h, s)]
    y = torch.stack(rows, -2)
    return torch.stack([y[..., j : j + s].mean(-1) for j in range(0, w, s)], -1)


def spconv_reference(m: SPConv, x: torch.Tensor) -> torch.Tensor:
    """The official SPConv_3x3 in eval, then the final BN and activation, one image and channel at a time for the
    fusion."""
    c = m.representative
    x_r, x_u = x[:, :c], x[:, c:]
    g = m.gwc
    r = F.conv2d(x_r, g.weight, None, g.stride, g.padding, g.dilation, g.groups)
    r = bn_eval(r + F.conv2d(pooled(x_r, m.stride), m.pwc.weight), m.rep_bn)
    u = bn_eval(F.conv2d(pooled(x_u, m.stride), m.cheap.weight), m.red_bn)
    out = torch.empty_like(r)
    for b in range(r.shape[0]):
        for o in range(r.shape[1]):
            gap_r, gap_u = r[b, o].mean(), u[b, o].mean()
            a = torch.exp(gap_r) / (torch.exp(gap_r) + torch.exp(gap_u))
            out[b, o] = a * r[b, o] + (1 - a) * u[b, o]
    return m.act(bn_eval(out, m.bn))


@pytest.mark.parametrize(("c1", "c2", "k", "s", "d", "alpha", "groups"),
                         [(16, 32, 3, 1, 1, 0.5, 2), (16, 32, 3, 2, 1, 0.5, 2), (12, 9, 5, 2, 1, 0.75, 3),
                          (8, 8, 1, 1, 1, 0.25, 2), (16, 16, 3, 1, 2, 0.5, 4), (9, 12, 3, 3, 1, 0.5, 4)])
@pytest.mark.parametrize("hw", [(1, 1), (7, 10), (8, 13)])
def test_equals_official_formulation(c1, c2, k, s, d, alpha, groups, hw):
    m = randomize_(SPConv(c1, c2, k, s, d=d, alpha=alpha, groups=groups)).eval()
    x = torch.randn(2, c1, *hw)
    with torch.no_grad():
        y, ref = m(x), spconv_reference(m, x)
        assert y.shape == ref.shape == (2, c2, -(-hw[0] // s), -(-hw[1] // s))
        assert rel_err(y, ref) < 1e-5
        m.fuse()
        assert rel_err(m(x), ref) < 1e-5


def test_branch_weights_are_the_softmax_of_global_averages():
    """A branch whose global average is far larger takes the whole output (before the final BN)."""
    m = SPConv(8, 8, 3, 1).eval()
    with torch.no_grad():
        m.red_bn.bias.fill_(30.0)  # U's global average >> R's: softmax weight of R ~ 0
        x = torch.randn(1, 8, 6, 6)
        x_u = x[:, m.representative :]
        u = bn_eval(F.conv2d(x_u, m.cheap.weight), m.red_bn)
        assert rel_err(m._fused_branches(x), u) < 1e-6
