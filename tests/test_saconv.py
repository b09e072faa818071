"""SAConv2d: shapes, gradients, modes, autocast, tracing, ONNX, fuse, state-dict conversion, reference, errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from ultralytics.nn.modules import Conv

from module_checks import bf16_forward, bf16_training_grads_finite, onnx_outputs, rel_err
from ref_saconv import SAConvNaive
from yolo_convplug.modules.saconv import SAConv2d

GRID = [(16, 32, 3, 2), (32, 32, 3, 1), (64, 128, 3, 2), (24, 40, 3, 1), (256, 256, 1, 1), (8, 16, 5, 1)]
SIZES = [1, 2, 7, 12]




def perturbed(m, seed=0):
    """``m`` with every zero-initialised SAC tensor and the BN statistics randomised (a trained-looking module)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("weight_diff", "pre_context.weight", "post_context.weight", "switch.weight"):
            p = m.get_parameter(name)
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        m.switch.bias.fill_(0.3)
        m.weight_gamma.uniform_(0.5, 1.5, generator=g)
        m.weight_beta.normal_(0, 0.05, generator=g)
        m.bn.weight.uniform_(0.5, 1.5, generator=g)
        m.bn.bias.normal_(0, 0.1, generator=g)
        m.bn.running_mean.normal_(0, 0.5, generator=g)
        m.bn.running_var.uniform_(0.5, 2.0, generator=g)
    return m


@pytest.mark.parametrize("c1,c2,k,s", GRID)
def test_output_shape_matches_ultralytics_conv(c1, c2, k, s):
    m, base = SAConv2d(c1, c2, k, s), Conv(c1, c2, k, s)
    for hw in SIZES:
        x = torch.randn(2, c1, hw, hw + 1)
        for mode in (True, False):
            m.train(mode)
            assert m(x).shape == base(x).shape


def test_one_by_one_input_at_every_stride():
    for s in (1, 2, 3):
        m = perturbed(SAConv2d(16, 16, 3, s))
        y = m(torch.randn(2, 16, 1, 1))
        assert y.shape == (2, 16, 1, 1) and torch.isfinite(y).all()


@pytest.mark.parametrize("c1,c2,k,s", [(16, 32, 3, 2), (24, 24, 1, 1)])
def test_gradients_reach_every_trainable_parameter(c1, c2, k, s):
    m = perturbed(SAConv2d(c1, c2, k, s)).train()
    x = torch.randn(2, c1, 9, 9, requires_grad=True)
    m(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_fresh_module_gets_gradients_for_zero_initialised_parameters():
    """At init S = 1 so dW has zero gradient, but every parameter must be connected to the graph."""
    m = SAConv2d(8, 8, 3).train()
    m(torch.randn(2, 8, 6, 6)).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    assert m.switch.weight.grad.abs().sum() > 0  # the switch can start learning


def test_matches_naive_reference_outputs_and_gradients():
    """Two explicit F.conv2d (dilation d and 3d), DetectoRS standardisation by autograd: same outputs and grads."""
    for c1, c2, k, s, hw in [(16, 24, 3, 2, 9), (32, 32, 3, 1, 5), (16, 16, 1, 1, 4), (16, 16, 3, 1, 1)]:
        m = perturbed(SAConv2d(c1, c2, k, s))
        with torch.no_grad():
            m.conv.weight.add_(0.05)  # a non-zero filter mean exercises the standardisation gradient
        ref = SAConvNaive(c1, c2, k, s)
        ref.load_state_dict(m.state_dict())
        x = torch.randn(3, c1, hw, hw)
        for mode in (True, False):
            m.train(mode), ref.train(mode)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = m(xa), ref(xb)
            assert rel_err(ya, yb) < 1e-5
            g = torch.randn_like(ya)
            ya.backward(g), yb.backward(g)
            assert rel_err(xa.grad, xb.grad) < 1e-4
            ref_params = dict(ref.named_parameters())
            for name, p in m.named_parameters():
                assert rel_err(p.grad, ref_params[name].grad, floor=1e-2) < 1e-4, name
            m.zero_grad(), ref.zero_grad()


def test_switch_blends_the_two_dilations():
    """S = 1 gives the dilation-d conv only, S = 0 the dilation-3d conv with W_hat + dW."""
    m = SAConv2d(8, 8, 3, act=False).eval()
    with torch.no_grad():
        m.weight_diff.normal_(0, 0.2)
    x = torch.randn(1, 8, 11, 11)
    w = m.standardized_weight()
    bn = lambda y: F.batch_norm(y, m.bn.running_mean, m.bn.running_var, m.bn.weight, m.bn.bias, False, 0, m.bn.eps)
    assert rel_err(m(x), bn(F.conv2d(x, w, None, 1, 1, 1))) < 1e-5
    with torch.no_grad():
        m.switch.bias.zero_()
    assert rel_err(m(x), bn(F.conv2d(x, w + m.weight_diff, None, 1, 3, 3))) < 1e-5


def test_weight_is_standardised_per_filter():
    m = SAConv2d(16, 8, 3)
    with torch.no_grad():
        m.conv.weight.mul_(7).add_(3)
    w = m.standardized_weight().flatten(1)
    assert torch.allclose(w.mean(1), torch.zeros(8), atol=1e-5)
    assert torch.allclose(w.std(1), torch.ones(8), atol=1e-3)


def test_train_and_eval_modes():
    m = perturbed(SAConv2d(8, 16, 3, 2))
    x = torch.randn(4, 8, 10, 10)
    m.train()
    before = m.bn.running_mean.clone()
    y_train = m(x)
    assert not torch.equal(before, m.bn.running_mean)  # BN uses batch statistics and updates its running ones
    m.eval()
    state = copy.deepcopy(m.state_dict())
    y1, y2 = m(x), m(x)
    assert torch.equal(y1, y2) and not torch.allclose(y_train, y1)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())  # eval forward mutates nothing


def test_forward_leaves_input_and_padding_untouched():
    m = perturbed(SAConv2d(8, 8, 3, 1, d=2)).eval()
    x = torch.randn(1, 8, 9, 9)
    x0 = x.clone()
    m(x)
    assert torch.equal(x, x0)
    assert m.conv.padding == (2, 2) and m.conv.dilation == (2, 2)


def test_bf16_autocast():
    m = perturbed(SAConv2d(16, 32, 3, 2))
    x = torch.randn(2, 16, 12, 12)
    for mode in (True, False):
        y, ref = bf16_forward(m.train(mode), x)
        assert y.shape == ref.shape and torch.isfinite(y).all()
        assert rel_err(y.float(), ref) < 0.1
    assert bf16_training_grads_finite(m, x)


def test_fuse_is_exact_and_drops_bn():
    for c1, c2, k, s, hw in [(16, 24, 3, 2, 9), (32, 32, 1, 1, 5), (16, 16, 3, 1, 1)]:
        m = perturbed(SAConv2d(c1, c2, k, s)).eval()
        with torch.no_grad():
            m.bn.weight[0] = 0.0  # a pruned channel: the fold must not divide by the BN scale
        x = torch.randn(2, c1, hw, hw)
        y = m(x)
        assert m.fuse() is m and not hasattr(m, "bn")
        assert rel_err(m(x), y) < 1e-5
        assert m.fuse() is m  # idempotent


def test_plain_conv_state_dict_converts_exactly():
    """An Ultralytics Conv's weights load strictly and the SAConv computes what the Conv computed (DetectoRS)."""
    for c1, c2, k, s in [(16, 32, 3, 2), (8, 8, 1, 1)]:
        plain = Conv(c1, c2, k, s)
        with torch.no_grad():
            plain.conv.weight.normal_(0.02, 0.1)
            plain.bn.running_mean.normal_()
            plain.bn.running_var.uniform_(0.5, 2)
        m = SAConv2d(c1, c2, k, s)
        m.load_state_dict(plain.state_dict())  # strict
        plain.eval(), m.eval()
        x = torch.randn(2, c1, 8, 8)
        assert rel_err(m.standardized_weight(), plain.conv.weight) < 1e-5
        assert rel_err(m(x), plain(x)) < 1e-5
        w = plain.conv.weight.flatten(1)
        assert torch.allclose(m.weight_beta.flatten(), w.mean(1))
        assert torch.allclose(m.weight_gamma.flatten(), (w.var(1) + 1e-5).sqrt())


def test_own_state_dict_is_not_converted():
    a, b = perturbed(SAConv2d(8, 16, 3)), SAConv2d(8, 16, 3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weight_gamma, b.weight_gamma) and torch.equal(a.weight_diff, b.weight_diff)
    missing = SAConv2d(8, 16, 3).load_state_dict({"conv.weight": torch.randn(16, 8, 3, 3)}, strict=False)
    assert "bn.weight" in missing.missing_keys and "weight_diff" not in missing.missing_keys


def test_jit_trace():
    m = perturbed(SAConv2d(16, 16, 3, 2)).eval()
    x = torch.randn(2, 16, 10, 10)
    traced = torch.jit.trace(m, x)
    x2 = torch.randn(3, 16, 6, 6)
    assert rel_err(traced(x2), m(x2)) < 1e-5
    torch.jit.save(traced, io.BytesIO())
    fused = copy.deepcopy(m).fuse()
    assert rel_err(torch.jit.trace(fused, x)(x2), m(x2)) < 1e-5


@pytest.mark.parametrize("fuse", [False, True])
def test_onnx_parity(fuse):
    m = perturbed(SAConv2d(16, 24, 3, 2)).eval()
    if fuse:
        m.fuse()
    for y, expected in onnx_outputs(m, torch.randn(1, 16, 12, 12)):
        assert rel_err(y, expected) < 1e-4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(c1=16, c2=16, k=2), "k=2"),
        (dict(c1=16, c2=16, k=3, g=3), "g=3"),
        (dict(c1=16, c2=24, k=3, g=16), "g=16"),
        (dict(c1=16, c2=16, k=3, p=0), "p=0"),
        (dict(c1="16", c2=16, k=3), "c1='16'"),
        (dict(c1=16, c2=16.0, k=3), "c2=16.0"),
        (dict(c1=16, c2=16, k=3, s=0), "s=0"),
        (dict(c1=16, c2=16, k=1, g=16), "c1/g\\*k\\*k=1"),
        (dict(c1=16, c2=16, k=3, act="relu"), "act='relu'"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAConv2d(**kwargs)


def test_yaml_style_positional_call():
    """A YAML row ``[-1, 1, SAConv2d, [64, 3, 2]]`` becomes ``SAConv2d(c1, 64, 3, 2)``."""
    m = SAConv2d(32, 64, 3, 2)
    assert m(torch.randn(1, 32, 16, 16)).shape == (1, 64, 8, 8)
    assert isinstance(SAConv2d(8, 8, 3, 1, None, 1, 1, nn.ReLU()).act, nn.ReLU)
    assert isinstance(SAConv2d(8, 8, 3, act=False).act, nn.Identity)
