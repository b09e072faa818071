"""Tests of PConv, FasterBlock and C2f_Faster (FasterNet, CVPR 2023) against C2f and naive references."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from module_checks import bf16_forward, bf16_training_grads_finite, onnx_outputs, rel_err
from ref_faster import PConvSlicing, PConvSplitCat, ReferenceC2fFaster, copy_weights
from ultralytics.nn.modules.block import C2f

from yolo_convplug.modules.faster import C2f_Faster, FasterBlock, PConv

# (c1, c2, n, feature-map size): YOLOv8n-like widths, the smallest width-scaled ones, 1x1 maps (imgsz 32 at P5)
C2F_GRID = [(8, 8, 1, 8), (16, 32, 1, 6), (32, 32, 2, 5), (48, 24, 1, 3), (64, 64, 1, 1), (128, 128, 2, 2)]


def _randomize_bn(module: nn.Module) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters so fuse/reference checks can fail."""
    g = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return module




@pytest.mark.parametrize("c1,c2,n,h", C2F_GRID)
@pytest.mark.parametrize("shortcut", [False, True])
def test_c2f_faster_shape_matches_c2f(c1, c2, n, h, shortcut):
    x = torch.randn(2, c1, h, h + 1)
    for mode in (True, False):
        m = C2f_Faster(c1, c2, n, shortcut).train(mode)
        y = m(x)
        assert y.shape == C2f(c1, c2, n, shortcut).train(mode)(x).shape
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("c1,c2,shortcut", [(16, 16, True), (16, 24, True), (8, 8, False)])
def test_faster_block_shape_and_residual(c1, c2, shortcut):
    block = FasterBlock(c1, c2, shortcut=shortcut).eval()
    x = torch.randn(2, c1, 7, 5)
    assert block(x).shape == (2, c2, 7, 5)
    assert block.add == (shortcut and c1 == c2)
    if block.add:  # the residual is exactly the input: zeroing the projection leaves y == x
        nn.init.zeros_(block.cv2.weight)
        assert torch.equal(block(x), x)


@pytest.mark.parametrize("c1,n,h", [(8, 1, 8), (32, 2, 5), (64, 1, 1)])
def test_gradients_reach_every_parameter(c1, n, h):
    m = C2f_Faster(c1, c1, n, True).train()
    x = torch.randn(2, c1, h, h, requires_grad=True)
    m(x).backward(torch.randn(2, c1, h, h))  # a random upstream gradient: a plain sum() would cancel through BN
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_train_updates_bn_eval_is_deterministic_and_per_sample():
    m = C2f_Faster(16, 16, 1, True)
    bn = m.m[0].cv1.bn
    before = bn.running_mean.clone()
    x = torch.randn(4, 16, 6, 6)
    m.train()(x)
    assert not torch.equal(bn.running_mean, before)
    m.eval()
    y = m(x)
    assert torch.equal(y, m(x))
    torch.testing.assert_close(m(x[:1]), y[:1], rtol=1e-5, atol=1e-6)  # eval: no dependence on the batch


def test_bf16_autocast():
    m = _randomize_bn(C2f_Faster(32, 32, 2, True)).eval()
    x = torch.randn(2, 32, 8, 8)
    y, ref = bf16_forward(m, x)
    assert y.dtype == torch.bfloat16
    assert torch.isfinite(y.float()).all()
    assert rel_err(y.float(), ref) < 5e-2
    assert bf16_training_grads_finite(m, x)  # training step under autocast too


@pytest.mark.parametrize("fused", [False, True])
def test_jit_trace(fused):
    m = _randomize_bn(C2f_Faster(16, 32, 2, True)).eval()
    if fused:
        m.fuse()
    x = torch.randn(2, 16, 8, 8)
    traced = torch.jit.trace(m, x)
    torch.testing.assert_close(traced(x), m(x))
    x3 = torch.randn(3, 16, 5, 7)  # the traced graph is not tied to the example's batch or size
    torch.testing.assert_close(traced(x3), m(x3))


@pytest.mark.parametrize("c,n_div,k", [(16, 4, 3), (24, 4, 3), (8, 2, 5), (40, 3, 3), (4, 4, 3), (16, 1, 3)])
def test_pconv_matches_fasternet_split_cat_and_slicing(c, n_div, k):
    m = PConv(c, c, k, 1, n_div)
    split_cat = copy_weights(PConvSplitCat(c, n_div, k), m)
    slicing = copy_weights(PConvSlicing(c, n_div, k), m)
    x = torch.randn(2, c, 6, 7, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, split_cat(x))
    with torch.no_grad():
        torch.testing.assert_close(y, slicing(x))
    cp = c // n_div
    assert torch.equal(y[:, cp:], x[:, cp:])  # the untouched channels pass through bit-exactly
    g = torch.randn_like(y)
    (gm,) = torch.autograd.grad(y, m.conv.weight, g)
    (gr,) = torch.autograd.grad(split_cat(x), split_cat.conv.weight, g)
    torch.testing.assert_close(gm, gr)


@pytest.mark.parametrize("n", [1, 2])
def test_c2f_faster_matches_reference(n):
    m = _randomize_bn(C2f_Faster(32, 48, n, True))
    ref = copy_weights(ReferenceC2fFaster(32, 48, n, True), m)
    x = torch.randn(2, 32, 6, 6)
    torch.testing.assert_close(m.eval()(x), ref.eval()(x))
    torch.testing.assert_close(m.train()(x), ref.train()(x))


@pytest.mark.parametrize("train", [False, True])
def test_input_never_mutated(train):
    x = torch.randn(2, 16, 6, 6)
    for m in (PConv(16), FasterBlock(16, 16), C2f_Faster(16, 16, 2, True)):
        m.train(train)
        x0, version = x.clone(), x._version
        with torch.inference_mode(not train):
            m(x)
        assert torch.equal(x, x0), type(m).__name__
        assert x._version == version, type(m).__name__


@pytest.mark.parametrize("c1,c2,n,h", C2F_GRID[:4])
def test_forward_equals_forward_split(c1, c2, n, h):
    m = _randomize_bn(C2f_Faster(c1, c2, n, True))
    assert isinstance(m, C2f)  # Ultralytics' exporter swaps forward for every C2f subclass
    x = torch.randn(2, c1, h, h)
    for mode in (False, True):
        m.train(mode)
        torch.testing.assert_close(m.forward_split(x), m(x), rtol=0, atol=0)
    exported = copy.deepcopy(m).eval()
    exported.forward = exported.forward_split  # what Exporter does
    torch.testing.assert_close(exported(x), m.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("c1,c2,n,h", C2F_GRID)
def test_fuse_is_exact(c1, c2, n, h):
    m = _randomize_bn(C2f_Faster(c1, c2, n, True)).eval()
    x = torch.randn(2, c1, h, h)
    y = m(x)
    assert m.fuse() is m
    assert not any(isinstance(b, nn.BatchNorm2d) for b in m.modules())
    assert rel_err(m(x), y) < 1e-5
    assert rel_err(m.fuse()(x), y) < 1e-5  # fusing twice is a no-op
    assert rel_err(m.forward_split(x), y) < 1e-5


def test_faster_block_fuse_and_drop_path():
    block = _randomize_bn(FasterBlock(16, 16, drop_path=0.5))
    x = torch.randn(64, 16, 4, 4)
    y = block.train()(x)  # whole samples are dropped: for those the output is the residual alone
    dropped = (y - x).flatten(1).abs().amax(1) == 0
    assert 0 < dropped.sum() < 64
    block.eval()
    y = block(x)
    assert block.fuse() is block and not hasattr(block.cv1, "bn")
    assert rel_err(block(x), y) < 1e-5


def test_fewer_params_than_c2f():
    for c1, c2, n in [(16, 16, 1), (32, 32, 1), (64, 64, 2), (128, 128, 2), (256, 256, 1), (192, 96, 3)]:
        ours = sum(p.numel() for p in C2f_Faster(c1, c2, n, True).parameters())
        base = sum(p.numel() for p in C2f(c1, c2, n, True).parameters())
        assert ours < base, (c1, c2, n, ours, base)


def test_no_leftover_bottleneck_params():
    m = C2f_Faster(32, 32, 2, True)
    assert all(isinstance(b, FasterBlock) for b in m.m)
    assert m.cv2.conv.in_channels == (2 + 2) * m.c
    assert {name.split(".")[0] for name, _ in m.named_parameters()} == {"cv1", "cv2", "m"}


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: PConv(16, 32), "c2=32"),
        (lambda: PConv(16, 16, 3, 2), "s=2"),
        (lambda: PConv(16, 16, 2), "k=2"),
        (lambda: PConv(16, 16, 3, 1, 0), "n_div=0"),
        (lambda: PConv(4, 4, 3, 1, 8), "n_div=8"),
        (lambda: PConv("16"), "c1='16'"),
        (lambda: FasterBlock(16, 16, drop_path=1.0), "drop_path=1.0"),
        (lambda: FasterBlock(16, 16, mlp_ratio=0), "mlp_ratio=0"),
        (lambda: FasterBlock(16, 16, act="relu"), "act='relu'"),
        (lambda: C2f_Faster(16, 16, 1, False, 2), "g=2"),
        (lambda: C2f_Faster(16, 16, -1), "n=-1"),
        (lambda: C2f_Faster(16, "32"), "c2='32'"),
        (lambda: C2f_Faster(16, 2, 1, False, 1, 0.25), "e=0.25"),
        (lambda: C2f_Faster(16, 8, 1, False, 1, 0.5, 8), "n_div=8"),
    ],
)
def test_bad_arguments_raise_value_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("fused", [False, True])
def test_onnx_parity(fused):
    m = _randomize_bn(C2f_Faster(16, 32, 2, True)).eval()
    if fused:
        m.fuse()
    for y, expected in onnx_outputs(m, torch.randn(1, 16, 8, 8)):
        assert rel_err(y, expected) < 1e-4
