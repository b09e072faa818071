"""CondConv: shapes vs Ultralytics Conv for groups, dilation, padding and even kernels, the per-sample reference loop,
per-sample routing, routing dropout, the batch-free im2col path traced at other batch sizes with those options, BN
folding into the experts, the exact and the noisy warm start from a stock Conv. Generic checks (shapes, gradients,
batch independence, ONNX, trace, autocast, input left untouched) live in test_contract.py; bad constructor arguments in
test_bad_input.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from module_checks import random_stock_conv, randomize_, rel_err
from ref_condconv import CondConvLoop
from ultralytics.nn.modules.conv import Conv

from yolo_convplug import ConversionError
from yolo_convplug.modules.condconv import CondConv
from yolo_convplug.modules.odconv import ODConv

# (c1, c2, k, s, p, g, d): groups, dilation, explicit padding and even kernels exercise every path
VARIANTS = [(8, 16, 3, 1, None, 2, 1), (16, 8, 3, 2, None, 1, 2), (24, 24, 5, 2, 1, 8, 1), (8, 8, 2, 1, None, 1, 1),
            (3, 16, 6, 2, 2, 1, 1), (16, 32, 1, 1, None, 1, 1)]


@pytest.mark.parametrize("c1, c2, k, s, p, g, d", VARIANTS)
def test_shape_matches_conv_variants(c1, c2, k, s, p, g, d):
    """Train and eval (the batch-free im2col path), where the contract covers the default geometry only."""
    x = torch.randn(2, c1, 11, 11)
    m, conv = CondConv(c1, c2, k, s, p, g, d), Conv(c1, c2, k, s, p, g, d)
    assert m(x).shape == conv(x).shape
    with torch.no_grad():
        assert m.eval()(x).shape == conv(x).shape


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("c1, c2, k, s", [(16, 32, 3, 2), (32, 32, 3, 1), (8, 16, 1, 1)])
def test_matches_per_sample_loop(c1, c2, k, s, train):
    """Batched grouped conv == the naive loop over samples (train without dropout: BN uses batch statistics), in its
    output and in the gradients of the input and of every parameter (the per-sample backward of the convolution)."""
    torch.manual_seed(0)
    m = CondConv(c1, c2, k, s, dropout=0.0)
    ref = CondConvLoop(c1, c2, k, s, dropout=0.0)
    randomize_(m)
    ref.load_state_dict(m.state_dict())
    m.train(train), ref.train(train)
    x = torch.randn(4, c1, 12, 12, requires_grad=True)
    y, y_ref = m(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(m.bn.running_mean, ref.bn.running_mean, atol=1e-6)
    g = torch.randn_like(y)
    names = [name for name, _ in m.named_parameters()]
    grads = torch.autograd.grad(y, [x, *m.parameters()], g)
    grads_ref = torch.autograd.grad(y_ref, [x, *(dict(ref.named_parameters())[name] for name in names)], g)
    for name, grad, grad_ref in zip(["input", *names], grads, grads_ref):
        assert rel_err(grad, grad_ref) < 1e-5, name


def test_samples_get_different_kernels():
    """Routing is per sample: two different samples mix different kernels (else this is a plain conv)."""
    m = CondConv(8, 8).eval()
    x = torch.randn(2, 8, 6, 6)
    r = m.routing_weights(x)
    assert r.shape == (2, 8) and not torch.allclose(r[0], r[1])


def test_dropout_acts_on_routing_only_in_training():
    m = CondConv(16, 16, dropout=0.5)
    x = torch.randn(2, 16, 5, 5)
    torch.manual_seed(1)
    r1 = m.routing_weights(x)
    torch.manual_seed(2)
    r2 = m.routing_weights(x)
    assert not torch.allclose(r1, r2)
    m.eval()
    torch.testing.assert_close(m.routing_weights(x), m.routing_weights(x))


def test_fresh_module_gets_gradient_everywhere():
    """A fresh CondConv (not only a trained-looking one, as in the contract) gives every parameter, the routing
    included, a non-zero gradient: the experts can separate from the first step."""
    m = CondConv(32, 32, 3, 1).train()
    x = torch.randn(3, 32, 9, 9)
    m(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


@pytest.mark.parametrize("c1, c2, k, s, p, g, d", [(8, 16, 3, 1, None, 2, 2), (24, 24, 5, 2, 1, 8, 1),
                                                   (8, 8, 2, 1, None, 1, 1)])
def test_jit_trace_runs_at_other_batch_sizes(c1, c2, k, s, p, g, d):
    """Traced at batch 2 (the batch-free im2col path), the graph gives the eager result at batch 1 and 3, with groups,
    dilation, explicit padding and an even kernel (the contract traces the default geometry)."""
    torch.manual_seed(0)
    m = CondConv(c1, c2, k, s, p, g, d)
    randomize_(m)
    m.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(m, torch.randn(2, c1, 12, 12))
    for b in (1, 3):
        x = torch.randn(b, c1, 12, 12)
        torch.testing.assert_close(traced(x), m(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("c1, c2, k, s, g", [(32, 32, 3, 1, 1), (16, 16, 3, 1, 4), (64, 64, 1, 1, 1)])
def test_fuse_folds_bn_into_the_experts(c1, c2, k, s, g):
    """The fused module has no BN and runs ``forward_fuse``, exactly, also grouped and 1x1, and it traces."""
    torch.manual_seed(0)
    m = CondConv(c1, c2, k, s, g=g)
    randomize_(m)
    m.eval()
    x = torch.randn(3, c1, 10, 10)
    before = m(x)
    assert m.fuse() is m
    assert not hasattr(m, "bn") and m.forward == m.forward_fuse
    after = m(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())
    with warnings.catch_warnings():  # the fused module traces too
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(m, x[:2])
    torch.testing.assert_close(traced(x), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("c1, c2, k, s, p, g, d", VARIANTS)
@pytest.mark.parametrize("experts", [2, 3, 8])
def test_converts_exactly_from_conv_without_noise(c1, c2, k, s, p, g, d, experts):
    """Experts = W, routing weight 0 and bias logit(1/E): every routing weight is 1/E, the output is the Conv's."""
    torch.manual_seed(0)
    conv = random_stock_conv(c1, c2, k, s, g=g, d=d, p=p)
    m = CondConv(c1, c2, k, s, p, g, d, experts=experts)
    randomize_(m, seed=1)  # every tensor is set, whatever it held
    assert m.convert_from(conv, noise=0) == f"{experts} experts = W"
    m.eval()
    x = torch.randn(3, c1, 12, 12)
    with torch.no_grad():
        assert rel_err(m(x), conv(x)) < 1e-5
        r = m.routing_weights(x)
    torch.testing.assert_close(r, torch.full_like(r, 1 / experts), rtol=1e-6, atol=0)


def test_default_noise_keeps_the_output_and_separates_the_experts():
    torch.manual_seed(0)
    conv = random_stock_conv(32, 64, 3, 2)
    m = CondConv(32, 64, 3, 2)
    assert m.convert_from(conv) == "8 experts = W + 1% noise"
    x = torch.randn(4, 32, 12, 12)
    with torch.no_grad():
        assert rel_err(m.eval()(x), conv(x)) < 0.05
    w = conv.conv.weight.flatten()
    deviation = (m.weight - w).std(1) / w.std()  # each expert's noise, relative to the kernel's std
    torch.testing.assert_close(deviation, torch.full_like(deviation, 0.01), rtol=0.1, atol=0)


def test_conversion_refuses_one_expert_and_names_the_mismatch():
    """The contract suite checks that every other geometry is refused; here, what the messages say."""
    with pytest.raises(ConversionError, match="experts=1"):
        CondConv(16, 32, 3, 2, experts=1).convert_from(Conv(16, 32, 3, 2))
    fused = Conv(16, 32, 3, 2)
    del fused.bn
    with pytest.raises(ConversionError, match="fused"):
        CondConv(16, 32, 3, 2).convert_from(fused)
    with pytest.raises(ConversionError, match=r"stock Conv vs CondConv: c2=64 vs 32, s=\(1, 1\) vs \(2, 2\)"):
        CondConv(16, 32, 3, 2).convert_from(Conv(16, 64, 3, 1))
    with pytest.raises(ConversionError, match=r"act=Identity vs SiLU"):
        CondConv(16, 32, 3, 2).convert_from(Conv(16, 32, 3, 2, act=False))
    with pytest.raises(ValueError, match=r"CondConv: noise=-1"):
        CondConv(16, 32, 3, 2).convert_from(Conv(16, 32, 3, 2), noise=-1)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [CondConv, ODConv], ids=lambda c: c.__name__)
def test_inductor_compiles_a_dynamic_batch_once_and_matches_eager(cls):
    """Ultralytics' compile=True (inductor) meets a new batch size at the last batch and in validation: the
    per-sample convolution compiles with a dynamic batch (the grouped form's groups = B broke inductor), trains,
    matches eager in its output and its gradients, and a third batch size compiles nothing new."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = cls(8, 16, 3, 2)
    compiled = torch.compile(m, dynamic=True)
    for b in (4, 3):
        compiled(torch.rand(b, 8, 12, 12)).sum().backward()
    graphs = counters["stats"]["unique_graphs"]
    x = torch.rand(5, 8, 12, 12)
    y = compiled(x)
    assert counters["stats"]["unique_graphs"] == graphs
    # train mode: ODConv's attention BN normalises over the 5 samples, which amplifies inductor's reordered float32
    # sums to up to 2e-5 (measured over 6 seeds); in eval the two agree to rounding (< 1e-6 measured)
    assert rel_err(y, m(x)) < 1e-4
    g = torch.randn_like(y)
    params = list(m.parameters())
    for compiled_grad, eager_grad in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(m(x), params, g)):
        assert rel_err(compiled_grad, eager_grad) < 1e-3  # the compiled backward (the operator's own for the conv)
    m.eval()
    assert rel_err(compiled(x), m(x)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("cls", [CondConv, ODConv], ids=lambda c: c.__name__)
def test_a_dynamic_conv_feeding_a_conv_trains_compiled_with_symbolic_map_sizes(cls):
    """Ultralytics' compile=True on yolov8n-condconv failed in inductor (the im2col form: "cannot determine truth
    value of Relational" on the next layer's input size) wherever a strided dynamic conv feeds a 1x1 Conv, as layer 7
    feeds C2f and SPPF. This is that failure's smallest form (it failed in 10 s where the whole model took 8 min):
    it compiles with a symbolic batch and map size, trains, and matches eager at a second batch size."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = torch.nn.Sequential(cls(8, 64, 3, 2), Conv(64, 64, 1))
    compiled = torch.compile(m, dynamic=True)
    for b in (2, 3):
        x = torch.rand(b, 8, 4, 4)
        y = compiled(x)
        y.sum().backward()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in m.parameters() if p.requires_grad)
    assert rel_err(y, m(x)) < 1e-4
