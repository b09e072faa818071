"""CondConv: shapes vs Ultralytics Conv, the per-sample reference loop, batch independence, gradients, autocast,
tracing at another batch size, BN folding, ONNX with a dynamic batch, warm start from a stock Conv, argument checks."""

from __future__ import annotations

import warnings

import pytest
import torch
from module_checks import bf16_forward, bf16_training_grads_finite, onnx_outputs, rel_err
from ref_condconv import CondConvLoop
from ultralytics.nn.modules.conv import Conv

from yolo_convplug import ConversionError
from yolo_convplug.modules.condconv import CondConv

YOLO_GRID = [(16, 32, 3, 2), (32, 32, 3, 1), (64, 64, 3, 1), (64, 128, 3, 2), (128, 128, 3, 1), (256, 256, 1, 1)]
# (c1, c2, k, s, p, g, d): groups, dilation, explicit padding and even kernels exercise every path
VARIANTS = [(8, 16, 3, 1, None, 2, 1), (16, 8, 3, 2, None, 1, 2), (24, 24, 5, 2, 1, 8, 1), (8, 8, 2, 1, None, 1, 1),
            (3, 16, 6, 2, 2, 1, 1)]


def randomize_bn(m: torch.nn.Module) -> None:
    """Non-trivial BN statistics and affine, so folding and eval are really tested."""
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("c1, c2, k, s", YOLO_GRID)
@pytest.mark.parametrize("hw", [1, 7, 16])
def test_shape_matches_conv(c1, c2, k, s, hw):
    x = torch.randn(2, c1, hw, hw)
    m = CondConv(c1, c2, k, s)
    expected = Conv(c1, c2, k, s)(x).shape
    assert m(x).shape == expected
    assert m.eval()(x).shape == expected


@pytest.mark.parametrize("c1, c2, k, s, p, g, d", VARIANTS)
def test_shape_matches_conv_variants(c1, c2, k, s, p, g, d):
    x = torch.randn(2, c1, 11, 11)
    assert CondConv(c1, c2, k, s, p, g, d)(x).shape == Conv(c1, c2, k, s, p, g, d)(x).shape


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("c1, c2, k, s", [(16, 32, 3, 2), (32, 32, 3, 1), (8, 16, 1, 1)])
def test_matches_per_sample_loop(c1, c2, k, s, train):
    """Batched grouped conv == the naive loop over samples (train without dropout: BN uses batch statistics)."""
    torch.manual_seed(0)
    m = CondConv(c1, c2, k, s, dropout=0.0)
    ref = CondConvLoop(c1, c2, k, s, dropout=0.0)
    randomize_bn(m)
    ref.load_state_dict(m.state_dict())
    m.train(train), ref.train(train)
    x = torch.randn(4, c1, 12, 12)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-5)
    assert torch.allclose(m.bn.running_mean, ref.bn.running_mean, atol=1e-6)


def test_samples_get_different_kernels():
    """Routing is per sample: two different samples mix different kernels (else this is a plain conv)."""
    m = CondConv(8, 8).eval()
    x = torch.randn(2, 8, 6, 6)
    r = m.routing_weights(x)
    assert r.shape == (2, 8) and not torch.allclose(r[0], r[1])


def test_eval_output_does_not_depend_on_batch():
    torch.manual_seed(0)
    m = CondConv(16, 32, 3, 2)
    randomize_bn(m)
    m.eval()
    x = torch.randn(5, 16, 10, 10)
    with torch.no_grad():
        alone = m(x[:1])
        together = m(x)
        other = m(torch.cat((x[:1], 10 * torch.randn(3, 16, 10, 10))))
    torch.testing.assert_close(together[:1], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other[:1], alone, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("c1, c2, k, s", [(16, 32, 3, 2), (32, 32, 3, 1)])
def test_gradients_reach_every_parameter(c1, c2, k, s):
    m = CondConv(c1, c2, k, s).train()
    x = torch.randn(3, c1, 9, 9, requires_grad=True)
    m(x).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bf16_autocast():
    torch.manual_seed(0)
    m = CondConv(32, 64, 3, 2).eval()
    x = torch.randn(2, 32, 16, 16)
    y, ref = bf16_forward(m, x)
    assert y.shape == ref.shape and torch.isfinite(y).all()
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max()
    assert bf16_training_grads_finite(m, x)


def test_input_is_not_mutated():
    m = CondConv(8, 8).eval()
    x = torch.randn(2, 8, 6, 6)
    before = x.clone()
    m(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("c1, c2, k, s, p, g, d", [(16, 32, 3, 2, None, 1, 1), (8, 16, 3, 1, None, 2, 2),
                                                   (24, 24, 5, 2, 1, 8, 1), (8, 8, 2, 1, None, 1, 1)])
def test_jit_trace_runs_at_other_batch_sizes(c1, c2, k, s, p, g, d):
    """Traced at batch 2 (the batch-free im2col path), the graph gives the eager result at batch 1 and 3."""
    torch.manual_seed(0)
    m = CondConv(c1, c2, k, s, p, g, d)
    randomize_bn(m)
    m.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(m, torch.randn(2, c1, 12, 12))
    for b in (1, 3):
        x = torch.randn(b, c1, 12, 12)
        torch.testing.assert_close(traced(x), m(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("c1, c2, k, s, g", [(16, 32, 3, 2, 1), (32, 32, 3, 1, 1), (16, 16, 3, 1, 4), (64, 64, 1, 1, 1)]
)
def test_fuse_is_exact(c1, c2, k, s, g):
    torch.manual_seed(0)
    m = CondConv(c1, c2, k, s, g=g)
    randomize_bn(m)
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


@pytest.mark.parametrize("fuse", [False, True])
def test_onnx_dynamic_batch_matches_pytorch(fuse):
    """Exported at batch 2, run at batches 1 and 3: no batch-size constant in the graph."""
    torch.manual_seed(0)
    m = CondConv(16, 32, 3, 2)
    randomize_bn(m)
    m.eval()
    if fuse:
        m.fuse()
    for y, expected in onnx_outputs(m, torch.randn(2, 16, 20, 20)):
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"experts": 0}, "experts"),
        ({"experts": 2.5}, "experts"),
        ({"experts": "8"}, "experts"),
        ({"g": 3}, "g"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"c1": "16"}, "c1"),
        ({"c2": 0}, "c2"),
        ({"k": 0}, "k"),
        ({"s": 1.5}, "s"),
        ({"p": -1}, "p"),
        ({"d": 0}, "d"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    args = {"c1": 16, "c2": 32, "k": 3, "s": 1, **kwargs}
    with pytest.raises(ValueError, match=rf"CondConv: {match}="):
        CondConv(**args)


def random_conv(c1, c2, k=3, s=1, p=None, g=1, d=1) -> Conv:
    """A stock Ultralytics Conv with random weights and non-trivial BN statistics, in eval."""
    conv = Conv(c1, c2, k, s, p, g, d)
    with torch.no_grad():
        conv.conv.weight.normal_(0, 0.2)
    randomize_bn(conv)
    return conv.eval()


@pytest.mark.parametrize("c1, c2, k, s, p, g, d", VARIANTS)
@pytest.mark.parametrize("experts", [2, 3, 8])
def test_converts_exactly_from_conv_without_noise(c1, c2, k, s, p, g, d, experts):
    """Experts = W, routing weight 0 and bias logit(1/E): every routing weight is 1/E, the output is the Conv's."""
    torch.manual_seed(0)
    conv = random_conv(c1, c2, k, s, p, g, d)
    m = CondConv(c1, c2, k, s, p, g, d, experts=experts)
    randomize_bn(m)  # every tensor is set, whatever it held
    assert m.convert_from(conv, noise=0) == f"{experts} experts = W"
    m.eval()
    x = torch.randn(3, c1, 12, 12)
    with torch.no_grad():
        assert rel_err(m(x), conv(x)) < 1e-5
        r = m.routing_weights(x)
    torch.testing.assert_close(r, torch.full_like(r, 1 / experts), rtol=1e-6, atol=0)


def test_default_noise_keeps_the_output_and_separates_the_experts():
    torch.manual_seed(0)
    conv = random_conv(32, 64, 3, 2)
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
