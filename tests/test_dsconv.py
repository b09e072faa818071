"""DSConv2d: quantisation, the kernel the conv uses, eval cache, STE, fuse, shapes, modes, tracing, ONNX, errors."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from ultralytics.nn.modules import Conv

from module_checks import bf16_forward, bf16_training_grads_finite, onnx_outputs, rel_err
from ref_dsconv import DSConvNaive
from yolo_convplug.modules.dsconv import DSConv2d

GRID = [(16, 32, 3, 2), (32, 32, 3, 1), (64, 128, 3, 2), (40, 24, 3, 1), (256, 256, 1, 1), (8, 16, 5, 1)]




def trained_like(m, seed=0):
    """``m`` with random BN statistics and (when present) random KDS bias / CDS."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.bn.weight.uniform_(0.5, 1.5, generator=g)
        m.bn.bias.normal_(0, 0.1, generator=g)
        m.bn.running_mean.normal_(0, 0.5, generator=g)
        m.bn.running_var.uniform_(0.5, 2.0, generator=g)
        for p in (m.kds_bias, m.cds_bias):
            if p is not None:
                p.normal_(0, 0.01, generator=g)
        if m.cds_weight is not None:
            m.cds_weight.uniform_(0.5, 1.5, generator=g)
    return m


def conv_with(m, weight, x):
    """``act(bn(conv(x, weight)))`` with the module's geometry: what the module must compute."""
    c = m.conv
    return m.act(m.bn(F.conv2d(x, weight, m.cds_bias, c.stride, c.padding, c.dilation, c.groups)))


def blocks_of(m, t):
    """Split a (c2, c1/g, k, k) tensor into its quantisation blocks along the input channels."""
    return torch.split(t, m.block_size, dim=1)


@pytest.mark.parametrize("c1,c2,k,s", GRID)
def test_output_shape_matches_ultralytics_conv(c1, c2, k, s):
    m, base = DSConv2d(c1, c2, k, s), Conv(c1, c2, k, s)
    for hw in (1, 2, 7, 12):
        x = torch.randn(2, c1, hw, hw + 1)
        for mode in (True, False):
            m.train(mode)
            assert m(x).shape == base(x).shape


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("c1,g,block_size", [(40, 1, 32), (64, 1, 16), (48, 2, 7), (16, 1, 1)])
def test_integer_kernel_levels_and_range(bits, c1, g, block_size):
    m = DSConv2d(c1, 16, 3, g=g, bits=bits, block_size=block_size)
    vqk, scale = m.integer_kernel()
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert vqk.dtype == torch.int8 and vqk.shape == m.conv.weight.shape
    assert vqk.min() >= qmin and vqk.max() <= qmax
    assert scale.shape == (16, -(-c1 // g // block_size), 3, 3)
    w = m.dequantized_weight()
    for b, (block_q, block_w) in enumerate(zip(blocks_of(m, vqk), blocks_of(m, w))):
        # every block's largest-magnitude weight sits on -2^(bits-1): the integers span the range
        assert (block_q.amin(1) == qmin).all()
        for o in range(0, 16, 5):
            for i in range(3):
                assert block_w[o, :, i, i].unique().numel() <= 2**bits
        # dequantised kernel == VQK x KDS scale, block by block
        assert torch.allclose(block_w, block_q.float() * scale[:, b : b + 1], rtol=1e-6, atol=0)
    assert vqk.unique().numel() <= 2**bits


def test_last_block_may_be_shorter():
    m = DSConv2d(40, 8, 3, block_size=32)  # blocks of 32 and 8 input channels
    assert m.n_blocks == 2
    with torch.no_grad():
        m.conv.weight[:, 32:] *= 100  # the short block has its own scale, unaffected by the first
    vqk, scale = m.integer_kernel()
    assert (scale[:, 1].abs() > 10 * scale[:, 0].abs()).all()
    assert (vqk[:, :32].amin(1) == -8).all() and (vqk[:, 32:].amin(1) == -8).all()


def test_kds_bias_shifts_each_block():
    m = DSConv2d(40, 8, 3, kds_bias=True)
    with torch.no_grad():
        m.kds_bias.normal_()
    vqk, scale, bias = m.integer_kernel()
    w = m.dequantized_weight()
    for b, (bq, bw) in enumerate(zip(blocks_of(m, vqk), blocks_of(m, w))):
        assert torch.allclose(bw, bq.float() * scale[:, b : b + 1] + bias[:, b : b + 1], atol=1e-6)


def test_least_squares_scale_beats_the_max_abs_step():
    """The KDS scale fits the block by least squares (the paper's L2 rule): never worse than the plain step."""
    m = DSConv2d(64, 32, 3, bits=3)
    w = m.conv.weight.detach()
    vqk, scale = m.integer_kernel()
    err = (m.dequantized_weight() - w).square().sum()
    step = torch.cat([blk.gather(1, blk.abs().argmax(1, keepdim=True)) / -4 for blk in blocks_of(m, w)], 1)
    err_step = (vqk.float() * step.repeat_interleave(32, 1) - w).square().sum()
    assert err <= err_step


@pytest.mark.parametrize("kwargs", [{}, {"kds_bias": True}, {"cds": True}, {"g": 2, "block_size": 5}, {"d": 2}])
def test_the_conv_uses_the_dequantised_kernel(kwargs):
    """The seed's bug was a forward that ignored its quantisation: here the output must be conv(x, W_q)."""
    m = trained_like(DSConv2d(24, 16, 3, bits=2, **kwargs))
    x = torch.randn(2, 24, 9, 9)
    for mode in (False, True):
        m.train(mode)
        assert rel_err(m(x), conv_with(m, m.dequantized_weight(), x)) < 1e-6
    m.eval()
    float_weight = m.conv.weight if m.cds_weight is None else m.conv.weight * m.cds_weight.view(-1, 1, 1, 1)
    assert rel_err(m(x), conv_with(m, float_weight, x)) > 1e-2  # 2-bit kernel: visibly not the float one


@pytest.mark.parametrize("kwargs", [{}, {"kds_bias": True, "cds": True}])
def test_matches_naive_reference(kwargs):
    for c1, c2, k, s in [(40, 24, 3, 2), (16, 16, 1, 1)]:
        m = trained_like(DSConv2d(c1, c2, k, s, **kwargs))
        ref = DSConvNaive(c1, c2, k, s, **kwargs)
        ref.load_state_dict(m.state_dict())
        x = torch.randn(3, c1, 8, 8)
        for mode in (True, False):
            m.train(mode), ref.train(mode)
            ya, yb = m(x), ref(x)
            assert rel_err(ya, yb) < 1e-6
            g = torch.randn_like(ya)
            ya.backward(g), yb.backward(g)
            ref_params = dict(ref.named_parameters())
            for name, p in m.named_parameters():
                assert rel_err(p.grad, ref_params[name].grad, floor=1e-2) < 1e-5, name
            m.zero_grad(), ref.zero_grad()


def test_straight_through_gradient_reaches_the_shadow_weights():
    m = trained_like(DSConv2d(16, 8, 3, kds_bias=True, cds=True)).train()
    x = torch.randn(2, 16, 7, 7)
    m(x).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # STE: dL/dW equals dL/dW_q as if quantisation were the identity (W_q = kernel before the CDS scale)
    cds = m.cds_weight.view(-1, 1, 1, 1)
    w_q = (m.dequantized_weight() / cds).detach().requires_grad_()
    y = m.act(F.batch_norm(F.conv2d(x, w_q * cds, m.cds_bias, 1, 1), None, None, m.bn.weight, m.bn.bias, True))
    y.square().sum().backward()
    m.zero_grad()
    m(x).square().sum().backward()
    assert rel_err(m.conv.weight.grad, w_q.grad) < 1e-5


def test_eval_kernel_is_cached_and_refreshed_when_weights_change():
    m = trained_like(DSConv2d(16, 8, 3)).eval()
    x = torch.randn(1, 16, 6, 6)
    calls = []
    build = m._kernel
    m._kernel = lambda straight_through: calls.append(straight_through) or build(straight_through)
    with torch.no_grad():
        y1 = m(x)
        kernel = m._eval_kernel()
        y2 = m(x)
    assert len(calls) == 1 and m._eval_kernel() is kernel and torch.equal(y1, y2)
    # an optimizer step (still in eval mode: only the weight's version tells) makes the next eval forward rebuild
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    calls.clear()
    m(x).square().sum().backward()  # autograd on: the straight-through path, not the cache
    opt.step()
    with torch.no_grad():
        y3 = m(x)
        y4 = m(x)
    assert calls == [True, False] and not torch.equal(y3, y1) and torch.equal(y3, y4)
    assert rel_err(y3, conv_with(m, build(False), x)) < 1e-6
    # an in-place edit, a state-dict load, train()/eval() and a dtype move also invalidate
    def edit():
        with torch.no_grad():
            m.conv.weight.mul_(2)

    for change in (
        edit,
        lambda: m.load_state_dict(trained_like(DSConv2d(16, 8, 3), seed=1).state_dict()),
        lambda: m.train().eval(),
        lambda: m.double(),
    ):
        calls.clear()
        change()
        with torch.no_grad():
            m(x.to(m.conv.weight.dtype))
        assert len(calls) == 1
        assert m._eval_kernel().dtype == m.conv.weight.dtype


def test_eval_with_autograd_still_trains_through_ste():
    """Eval mode with gradients on (e.g. a frozen-BN fine-tune) must not use the detached cache."""
    m = DSConv2d(8, 8, 3).eval()
    m(torch.randn(1, 8, 5, 5)).sum().backward()
    assert m.conv.weight.grad is not None and m._cache is None


def test_checkpoints_do_not_carry_the_cache():
    m = DSConv2d(8, 8, 3).eval()
    with torch.no_grad():
        m(torch.randn(1, 8, 5, 5))
    assert m._cache is not None
    assert copy.deepcopy(m)._cache is None and pickle.loads(pickle.dumps(m))._cache is None


def test_size_ratio():
    assert DSConv2d(64, 64, 3, bits=4, block_size=32).size_ratio() == pytest.approx((4 + 32 / 32) / 32)
    m = DSConv2d(40, 16, 3, bits=3, block_size=32, kds_bias=True, cds=True)
    n = 16 * 40 * 9
    expected = (n * 3 + 32 * (2 * 16 * 2 * 9 + 2 * 16)) / (32 * n)
    assert m.size_ratio() == pytest.approx(expected)
    assert DSConv2d(256, 256, 3, bits=2, block_size=64).size_ratio() < 0.1


@pytest.mark.parametrize("kwargs", [{}, {"kds_bias": True, "cds": True}])
def test_fuse_is_exact(kwargs):
    m = trained_like(DSConv2d(24, 16, 3, 2, **kwargs)).eval()
    x = torch.randn(2, 24, 9, 9)
    y = m(x)
    before = m.integer_kernel()
    assert m.fuse() is m and not hasattr(m, "bn")
    assert rel_err(m(x), y) < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(before, m.integer_kernel()))  # still the pre-fuse quantisation


def test_train_and_eval_modes():
    m = trained_like(DSConv2d(8, 16, 3, 2))
    x = torch.randn(4, 8, 10, 10)
    before = m.bn.running_mean.clone()
    y_train = m.train()(x)
    assert not torch.equal(before, m.bn.running_mean)
    m.eval()
    y1, y2 = m(x), m(x)
    assert torch.equal(y1, y2) and not torch.allclose(y_train, y1)
    x0 = x.clone()
    m(x)
    assert torch.equal(x, x0)


def test_bf16_autocast():
    m = trained_like(DSConv2d(16, 32, 3, 2, kds_bias=True, cds=True))
    x = torch.randn(2, 16, 12, 12)
    for mode in (True, False):
        y, ref = bf16_forward(m.train(mode), x)
        assert y.shape == ref.shape and torch.isfinite(y).all() and rel_err(y.float(), ref) < 0.1
    assert bf16_training_grads_finite(m, x)


@pytest.mark.parametrize("fuse", [False, True])
def test_jit_trace(fuse):
    m = trained_like(DSConv2d(16, 16, 3, 2, kds_bias=True)).eval()
    if fuse:
        m.fuse()
    x, x2 = torch.randn(2, 16, 10, 10), torch.randn(3, 16, 6, 6)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            traced = torch.jit.trace(m, x)
        assert rel_err(traced(x2), m(x2)) < 1e-6
        torch.jit.save(traced, io.BytesIO())


@pytest.mark.parametrize("fuse", [False, True])
def test_onnx_parity(fuse):
    m = trained_like(DSConv2d(16, 24, 3, 2, kds_bias=True, cds=True)).eval()
    if fuse:
        m.fuse()
    for y, expected in onnx_outputs(m, torch.randn(1, 16, 12, 12)):
        assert rel_err(y, expected) < 1e-4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=1), "bits=1"),
        (dict(bits=9), "bits=9"),
        (dict(bits=4.0), "bits=4.0"),
        (dict(bits=True), "bits=True"),
        (dict(block_size=0), "block_size=0"),
        (dict(block_size=-4), "block_size=-4"),
        (dict(block_size="32"), "block_size='32'"),
        (dict(g=3), "g=3"),
        (dict(c1="16"), "c1='16'"),
        (dict(k=0), "k=0"),
        (dict(p=-1), "p=-1"),
        (dict(act="silu"), "act='silu'"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    args = {"c1": 16, "c2": 16, "k": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        DSConv2d(**args)


def test_yaml_style_positional_call():
    """A YAML row ``[-1, 1, DSConv2d, [64, 3, 2, None, 1, 1, True, 2]]`` passes bits positionally after act."""
    m = DSConv2d(32, 64, 3, 2, None, 1, 1, True, 2, 16)
    assert m.bits == 2 and m.block_size == 16
    assert m(torch.randn(1, 32, 16, 16)).shape == (1, 64, 8, 8)
    assert isinstance(DSConv2d(8, 8, 3, act=nn.ReLU()).act, nn.ReLU)
