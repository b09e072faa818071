"""PConv, FasterBlock and C2f_Faster (FasterNet, CVPR 2023) against FasterNet's own formulation and C2f: PConv's two
official forwards, the always-on residual, the hand-written C2f reference, the exporter's forward_split, drop path,
what fuse leaves, params, warm start from C2f/C3k2. Generic checks (shape, gradients, fuse exact and idempotent, ONNX,
trace, autocast) live in test_contract.py, bad constructor arguments in test_bad_input.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from module_checks import randomize_, rel_err
from ref_faster import PConvSlicing, PConvSplitCat, ReferenceC2fFaster, copy_weights
from ultralytics.nn.modules.block import C2f, C3k2

from yolo_convplug.modules._utils import fuse_convs
from yolo_convplug.modules.faster import C2f_Faster, FasterBlock, PConv
from yolo_convplug.registry import ConversionError

# (c1, c2, n, feature-map size): YOLOv8n-like widths, the smallest width-scaled ones, 1x1 maps (imgsz 32 at P5)
C2F_GRID = [(8, 8, 1, 8), (16, 32, 1, 6), (32, 32, 2, 5), (48, 24, 1, 3), (64, 64, 1, 1), (128, 128, 2, 2)]


@pytest.mark.parametrize("c1,c2,shortcut", [(16, 16, True), (16, 24, True), (8, 8, False)])
def test_standalone_faster_block_residual_option(c1, c2, shortcut):
    block = FasterBlock(c1, c2, shortcut=shortcut).eval()
    x = torch.randn(2, c1, 7, 5)
    assert block(x).shape == (2, c2, 7, 5)
    assert block.add == (shortcut and c1 == c2)
    nn.init.zeros_(block.cv2.weight)  # branch = 0: the output is the residual alone, or 0 without one
    assert torch.equal(block(x), x if block.add else torch.zeros(2, c2, 7, 5))


def _zero_parameters(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


@pytest.mark.parametrize("shortcut", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_c2f_faster_blocks_always_add_their_residual(shortcut, train):
    """FasterNet adds the residual in every block (Fig. 4, the official MLPBlock), whatever C2f's shortcut flag: a
    block with all its parameters zeroed returns its input, and C2f_Faster with such blocks is
    cv2(cat(a, b, b, ...))."""
    m = randomize_(C2f_Faster(16, 24, 3, shortcut)).train(train)
    for block in m.m:
        assert block.add
        _zero_parameters(block)
    x = torch.randn(2, 16, 6, 5)
    z = torch.randn(2, m.c, 6, 5)
    assert all(torch.equal(block(z), z) for block in m.m)
    with torch.no_grad():
        a, b = m.cv1(x).chunk(2, 1)
        expected = m.cv2(torch.cat((a, b, b, b, b), 1))  # BN statistics update twice in train mode: same batch
        torch.testing.assert_close(m(x), expected)


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


@pytest.mark.parametrize("n,shortcut", [(1, True), (2, True), (2, False)])
def test_c2f_faster_matches_reference(n, shortcut):
    m = randomize_(C2f_Faster(32, 48, n, shortcut))
    ref = copy_weights(ReferenceC2fFaster(32, 48, n), m)
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
    m = randomize_(C2f_Faster(c1, c2, n, True))
    assert isinstance(m, C2f)  # Ultralytics' exporter swaps forward for every C2f subclass
    x = torch.randn(2, c1, h, h)
    for mode in (False, True):
        m.train(mode)
        torch.testing.assert_close(m.forward_split(x), m(x), rtol=0, atol=0)
    exported = copy.deepcopy(m).eval()
    exported.forward = exported.forward_split  # what Exporter does
    torch.testing.assert_close(exported(x), m.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("c1,c2,n,h", C2F_GRID[2:4])
def test_fuse_folds_every_bn_and_forward_split_after_fuse(c1, c2, n, h):
    m = randomize_(C2f_Faster(c1, c2, n, True)).eval()
    x = torch.randn(2, c1, h, h)
    y = m(x)
    m.fuse()
    assert not any(isinstance(b, nn.BatchNorm2d) for b in m.modules())
    assert rel_err(m.forward_split(x), y) < 1e-5


def test_faster_block_fuse_and_drop_path():
    block = randomize_(FasterBlock(16, 16, drop_path=0.5))
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


def _stock(cls, *args):
    """A stock Ultralytics layer with non-trivial BN affine and statistics, in eval."""
    torch.manual_seed(0)
    return randomize_(cls(*args)).eval()


@pytest.mark.parametrize(
    "stock,n,shortcut",
    [
        (lambda: _stock(C2f, 16, 32, 2, True), 2, True),
        (lambda: _stock(C2f, 32, 32, 1, False), 1, False),
        (lambda: _stock(C3k2, 16, 32, 2, False, 0.25), 2, False),  # YOLO11's backbone C3k2 (c3k=False, e=0.25)
        (lambda: _stock(C3k2, 32, 32, 1, True, 0.5), 1, True),  # C3k2 with C3k blocks: cv1/cv2 are C2f's all the same
    ],
)
def test_convert_from_stock_is_c2f_with_identity_bottlenecks(stock, n, shortcut):
    """Warm start: cv1/cv2 copied, every FasterBlock the identity, so the layer computes the stock layer's cv2 over
    cat(a, b, b, ..., b): C2f with its bottlenecks replaced by the identity, written here from the stock cv1/cv2."""
    stock = stock()
    e = stock.c / stock.cv2.conv.out_channels
    m = C2f_Faster(stock.cv1.conv.in_channels, stock.cv2.conv.out_channels, n, shortcut, 1, e)
    assert m.convert_from(stock) == f"cv1/cv2 copied, {n} FasterBlock{'s start' if n > 1 else ' starts'} as identity"
    x = torch.randn(2, m.cv1.conv.in_channels, 8, 7)
    with torch.no_grad():
        a, b = stock.cv1(x).chunk(2, 1)
        expected = stock.cv2(torch.cat((a, b, *[b] * n), 1))
        torch.testing.assert_close(m.eval()(x), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(stock(x), expected)  # the stock bottlenecks did something: the test can tell
    for block in m.m:
        assert block.cv2.weight.abs().sum() == 0  # branch zero at start; its other weights stay trainable
    m.train()(x).square().sum().backward()
    assert all(block.cv2.weight.grad.abs().sum() > 0 for block in m.m)


@pytest.mark.parametrize(
    "stock,args,match",
    [
        (lambda: C2f(16, 32, 3), (16, 32, 2), r"cv2 kernel .* \(stock, n=3\)"),  # cv2 reads (2 + n) * c channels
        (lambda: C2f(16, 32, 1, False, 1, 0.25), (16, 32, 1), "cv1 kernel"),  # another e
        (lambda: C2f(8, 32, 1), (16, 32, 1), "cv1 kernel"),  # another c1
        (lambda: fuse_convs(_stock(C2f, 16, 32, 1)), (16, 32, 1), "fused"),  # as BaseModel.fuse leaves it
    ],
)
def test_convert_from_mismatch_raises(stock, args, match):
    stock = stock()
    m = C2f_Faster(*args)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ConversionError, match=match):
        m.convert_from(stock)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # nothing half-converted
