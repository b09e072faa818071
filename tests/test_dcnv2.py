"""DCNv2's own math against a bilinear-sampling loop written here, its exact start as a plain Conv, the learning of
offsets from their zero start, the guard against NaN offsets and its FLOP rule.

The generic contract (shapes, gradients, fuse, ONNX DeformConv at opset 19, tracing, bf16, fp16, bad channel counts,
warm start within ``conversion_error``) lives in test_contract.py, deformable_groups that do not divide c1 in
test_bad_input.py.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from module_checks import rel_err
from ultralytics.nn.modules import Conv

from yolo_convplug.modules.dcnv2 import DCNv2


def bilinear(x: torch.Tensor, y: float, x_: float) -> torch.Tensor:
    """The (C,) values of the (C, H, W) map ``x`` at the real position (y, x_), bilinear, zero outside the map."""
    c, h, w = x.shape
    out = torch.zeros(c, dtype=x.dtype)
    if not (-1 < y < h and -1 < x_ < w):
        return out
    y0, x0 = math.floor(y), math.floor(x_)
    for yy, xx in itertools.product((y0, y0 + 1), (x0, x0 + 1)):
        if 0 <= yy < h and 0 <= xx < w:
            out += (1 - abs(y - yy)) * (1 - abs(x_ - xx)) * x[:, yy, xx]
    return out


def modulated_deform_conv_loop(x, offset, mask, weight, stride, padding, dilation, groups, offset_groups):
    """DCNv2 written out: for every output position and tap k, sample ``x`` at the tap's grid position plus its
    offset (dy, dx) = offset[2k], offset[2k+1] (per offset group), multiply by the mask, convolve with the kernel."""
    b, c1, _, _ = x.shape
    c2, c1g, kh, kw = weight.shape
    ho, wo = offset.shape[2:]
    taps = kh * kw
    out = torch.zeros(b, c2, ho, wo, dtype=x.dtype)
    per_offset_group, c2g = c1 // offset_groups, c2 // groups
    for n, i, j in itertools.product(range(b), range(ho), range(wo)):
        cols = torch.zeros(c1, kh, kw, dtype=x.dtype)  # the sampled, modulated input of this output position
        for og, u, v in itertools.product(range(offset_groups), range(kh), range(kw)):
            t = og * taps + u * kw + v
            dy, dx = offset[n, 2 * t, i, j].item(), offset[n, 2 * t + 1, i, j].item()
            py, px = i * stride - padding + u * dilation + dy, j * stride - padding + v * dilation + dx
            channels = slice(og * per_offset_group, (og + 1) * per_offset_group)
            cols[channels, u, v] = mask[n, t, i, j] * bilinear(x[n, channels], py, px)
        for gi in range(groups):
            w = weight[gi * c2g:(gi + 1) * c2g].flatten(1)
            out[n, gi * c2g:(gi + 1) * c2g, i, j] = w @ cols[gi * c1g:(gi + 1) * c1g].flatten()
    return out


@pytest.mark.parametrize(
    ("c1", "c2", "k", "s", "p", "g", "d", "dg"),
    [(4, 6, 3, 1, None, 1, 1, 1), (4, 6, 3, 2, None, 2, 1, 2), (4, 4, 3, 1, 2, 1, 2, 1), (2, 4, 1, 1, None, 1, 1, 2),
     (4, 2, 5, 2, 1, 1, 1, 4)],
)
def test_matches_the_bilinear_sampling_loop(c1, c2, k, s, p, g, d, dg):
    """With large random offsets (samples crossing the borders) and masks, in float64: the module's convolution
    before BN equals the loop, offsets and mask taken from its own offset/mask convolution."""
    torch.manual_seed(0)
    m = DCNv2(c1, c2, k, s, p, g, d, deformable_groups=dg).double()
    with torch.no_grad():
        m.conv_om.weight.normal_(0, 1.0)
        m.conv_om.bias.normal_(0, 1.0)
    x = torch.randn(2, c1, 6, 7, dtype=torch.float64)
    om = m.conv_om(x)
    n = dg * k * k
    offset, mask = om[:, :2 * n], 2 * torch.sigmoid(om[:, 2 * n:])
    assert offset.abs().max() > 2  # samples land well off the grid, some outside the map
    expected = modulated_deform_conv_loop(x, offset, mask, m.conv.weight, s, m.conv.padding[0], d, g, dg)
    assert rel_err(m.modulated_conv(x), expected) < 1e-12


def test_fresh_module_is_the_fresh_conv_of_the_same_seed():
    """Zero offsets and modulation 1 at the start: a fresh DCNv2 computes what a fresh Conv of the same seed does,
    in training (batch statistics) and after one step of BN statistics, in eval."""
    torch.manual_seed(3)
    conv = Conv(8, 16, 3, 2)
    torch.manual_seed(3)
    m = DCNv2(8, 16, 3, 2)
    x = torch.randn(2, 8, 11, 9)
    assert rel_err(m.train()(x), conv.train()(x)) < 1e-5
    assert rel_err(m.eval()(x), conv.eval()(x)) < 1e-5


def test_offsets_and_mask_learn_from_their_zero_start():
    """The zero-initialised offset/mask convolution gets gradient at once (the input's spatial gradient for the
    offsets, the sampled values for the mask), and a step moves the output."""
    torch.manual_seed(0)
    m = DCNv2(8, 8, 3)
    x, target = torch.randn(2, 8, 10, 10), torch.randn(2, 8, 10, 10)
    y0 = m.eval()(x)
    F.mse_loss(m.train()(x), target).backward()
    grad = m.conv_om.weight.grad
    assert grad[:2 * 9].abs().sum() > 0 and grad[2 * 9:].abs().sum() > 0  # offsets and mask logits
    torch.optim.SGD(m.conv_om.parameters(), lr=1.0).step()
    assert not torch.allclose(m.eval()(x), y0)


def test_hands_torchvision_finite_offsets_only(monkeypatch):
    """torchvision's deform_conv2d indexes memory with the sampling positions; NaN offsets (from NaN input, or
    Ultralytics' FLOP count on uninitialised memory) must reach it replaced, while NaN stays in its own sample."""
    import torchvision.ops

    original, seen = torchvision.ops.deform_conv2d, []

    def checked(x, offset, *args, **kwargs):
        seen.append(bool(torch.isfinite(offset).all()))
        return original(x, offset, *args, **kwargs)

    monkeypatch.setattr(torchvision.ops, "deform_conv2d", checked)
    m = DCNv2(8, 8, 3).eval()
    with torch.no_grad():
        m.conv_om.weight.normal_(0, 0.1)
    x = torch.randn(2, 8, 9, 9)
    x[0, 0, 4, 4], x[0, 1, 2, 2] = float("nan"), float("inf")
    y = m(x.requires_grad_())
    y.sum().backward()
    assert seen == [True]
    assert y[0].isnan().any() and torch.isfinite(y[1]).all()


def test_thop_rule_counts_the_convolution_and_the_modulated_sampling():
    """MACs: a Conv's (convolution + BN) + the offset/mask convolution + 5 MACs (bilinear sampling and modulation)
    for each of the k*k*c1 values sampled at every output position."""
    thop = pytest.importorskip("thop")
    x = torch.randn(1, 8, 12, 12)
    macs = lambda m: thop.profile(m, (x,), verbose=False)[0]  # noqa: E731
    offset_macs = macs(torch.nn.Conv2d(8, 3 * 9, 3, 2, 1))
    sampling = 5 * (6 * 6) * 8 * 9
    assert macs(DCNv2(8, 16, 3, 2)) - macs(Conv(8, 16, 3, 2)) == offset_macs + sampling
