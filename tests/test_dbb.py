"""DiverseBranchBlock against the sum of its four branches written here, its fused form (a plain Conv), the learning
of the branches a warm start zeroes and a trained-then-fused yolov8n-dbb model.

The generic contract (shapes, gradients, fuse within 1e-5, ONNX, tracing, bf16, fp16, warm start within
``conversion_error``) lives in test_contract.py, its argument limits in test_bad_input.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import CFG_MODELS, scaled
from module_checks import bn_eval, randomize_, rel_err
from torch.utils._pytree import tree_leaves
from ultralytics.nn.modules import Conv
from ultralytics.nn.tasks import DetectionModel

from yolo_convplug.modules.dbb import DiverseBranchBlock


def dbb_reference(m: DiverseBranchBlock, x: torch.Tensor) -> torch.Tensor:
    """The paper's block in eval: kxk-BN + 1x1-BN + 1x1-BN-avg-BN + 1x1-BN-kxk-BN, then SiLU. The branches that pad
    after their first 1x1 conv pad its output with zeros *before* that BN (the reference's BNAndPadLayer)."""
    k, s, p = m.k, m.s, m.k // 2
    kxk = bn_eval(F.conv2d(x, m.conv.weight, None, s, p), m.bn)
    one = bn_eval(F.conv2d(x, m.conv_1x1.weight, None, s), m.bn_1x1)
    avg = bn_eval(F.avg_pool2d(bn_eval(F.pad(F.conv2d(x, m.avg_conv.weight), [p] * 4), m.avg_bn_pad), k, s), m.avg_bn)
    identity = torch.eye(x.shape[1]).view(x.shape[1], x.shape[1], 1, 1)
    first = bn_eval(F.pad(F.conv2d(x, m.seq_1x1.weight + identity), [p] * 4), m.seq_bn_pad)
    seq = bn_eval(F.conv2d(first, m.seq_conv.weight, None, s), m.seq_bn)
    return F.silu(kxk + one + avg + seq)


@torch.no_grad()
def trained_looking(m):
    """Random BN statistics and affine parameters, and random values for the zero-initialised identity-based 1x1."""
    randomize_(m)
    m.seq_1x1.weight.normal_(0, 0.3)
    return m


@pytest.mark.parametrize(("c1", "c2", "k", "s"), [(8, 16, 3, 1), (8, 8, 3, 2), (4, 12, 5, 2), (6, 6, 1, 1)])
def test_equals_the_sum_of_its_branches(c1, c2, k, s):
    torch.manual_seed(0)
    m = trained_looking(DiverseBranchBlock(c1, c2, k, s)).eval()
    x = torch.randn(2, c1, 11, 9)
    with torch.no_grad():
        assert rel_err(m(x), dbb_reference(m, x)) < 1e-5


def test_fused_block_is_a_plain_conv():
    """After fuse() only a kxk conv with bias and the activation remain: Ultralytics' fused Conv computes the same
    from those two tensors, and the fused output equals the branches' sum."""
    torch.manual_seed(0)
    m = trained_looking(DiverseBranchBlock(8, 16, 3, 2)).eval()
    x = torch.randn(2, 8, 12, 10)
    with torch.no_grad():
        expected = dbb_reference(m, x)
        m.fuse()
        assert set(m.state_dict()) == {"conv.weight", "conv.bias"}
        conv = Conv(8, 16, 3, 2)
        del conv.bn
        conv.conv = torch.nn.Conv2d(8, 16, 3, 2, 1)
        conv.conv.load_state_dict(m.conv.state_dict())
        assert rel_err(m(x), expected) < 1e-5
        assert torch.equal(conv.forward_fuse(x), m(x))


def test_branches_zeroed_by_the_warm_start_learn():
    """After convert_from the three extra branches add zero; their last BN's gamma gets gradient at once, and after
    one step the rest of each branch does too."""
    torch.manual_seed(0)
    stock = randomize_(Conv(8, 8, 3), seed=1).eval()
    m = DiverseBranchBlock(8, 8, 3)
    m.convert_from(stock)
    x, target = torch.randn(4, 8, 10, 10), torch.randn(4, 8, 10, 10)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    F.mse_loss(m.train()(x), target).backward()
    for last in (m.bn_1x1, m.avg_bn, m.seq_bn):
        assert last.weight.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    F.mse_loss(m(x), target).backward()
    for first in (m.conv_1x1, m.avg_conv, m.seq_1x1, m.seq_conv):
        assert first.weight.grad.abs().sum() > 0


def test_trained_then_fused_model_equals_the_unfused_model():
    """yolov8n-dbb with trained-looking BNs after a few training steps (weights and BN statistics moved): the fused
    model, every DBB a plain conv, gives the unfused model's outputs within 1e-4."""
    torch.manual_seed(0)
    model = DetectionModel(scaled(CFG_MODELS / "yolov8-dbb.yaml"), ch=3, nc=2, verbose=False)
    randomize_(model)  # BN statistics and affine parameters far from their initial values, as after long training
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for step in range(3):
        x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(step))
        loss = sum(((y - 0.1) ** 2).mean() for y in tree_leaves(model(x)) if isinstance(y, torch.Tensor))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        unfused = [t for t in tree_leaves(model(x)) if isinstance(t, torch.Tensor)]  # boxes, scores, raw maps
        fused_model = copy.deepcopy(model).fuse(verbose=False)
        fused = [t for t in tree_leaves(fused_model(x)) if isinstance(t, torch.Tensor)]
    blocks = [m for m in fused_model.modules() if isinstance(m, DiverseBranchBlock)]
    assert len(blocks) == 5 and all(set(b.state_dict()) == {"conv.weight", "conv.bias"} for b in blocks)
    assert len(fused) == len(unfused) > 1 and all(torch.isfinite(t).all() for t in unfused)
    assert max(rel_err(a, b) for a, b in zip(fused, unfused)) < 1e-4
