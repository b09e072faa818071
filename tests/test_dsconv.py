"""DSConv2d: block quantisation against the naive reference, the kernel the conv uses, STE and shift training modes,
eval cache, fuse, size, warm start from a stock Conv, the YAML's positional arguments. Generic checks (shape, gradients,
ONNX, trace, autocast) live in test_contract.py, bad constructor arguments in test_bad_input.py."""

from __future__ import annotations

import copy
import pickle
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from module_checks import onnx_outputs, random_stock_conv, randomize_, rel_err
from ref_dsconv import DSConvNaive, quantize_blocks

from yolo_convplug.modules._utils import fuse_convs
from yolo_convplug.modules.dsconv import MODES, DSConv2d
from yolo_convplug.registry import ConversionError


def trained_like(m, seed=0):
    """``m`` with random BN statistics and affine and (when present) random KDS bias and CDS bias
    (``module_checks.randomize_``: they start at zero) and a random CDS scale."""
    randomize_(m, seed)
    if m.cds_weight is not None:
        with torch.no_grad():
            m.cds_weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed))
    return m


def conv_with(m, weight, x):
    """``act(bn(conv(x, weight)))`` with the module's geometry: what the module must compute."""
    c = m.conv
    return m.act(m.bn(F.conv2d(x, weight, m.cds_bias, c.stride, c.padding, c.dilation, c.groups)))


def blocks_of(m, t):
    """Split a (c2, c1/g, k, k) tensor into its quantisation blocks along the input channels."""
    return torch.split(t, m.block_size, dim=1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("c1,g,block_size", [(40, 1, 32), (64, 1, 16), (48, 2, 7), (16, 1, 1)])
def test_integer_kernel_levels_and_range(bits, c1, g, block_size, mode):
    m = DSConv2d(c1, 16, 3, g=g, bits=bits, block_size=block_size, mode=mode)
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


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"kds_bias": True}, {"cds": True}, {"g": 2, "block_size": 5}, {"d": 2}, {"mode": "shift", "cds": True}],
)
def test_the_conv_uses_the_dequantised_kernel(kwargs):
    """The blog code's bug was a forward that ignored its quantisation: here the output must be conv(x, W_q)."""
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


@pytest.mark.parametrize("mode", MODES)
def test_eval_kernel_is_cached_and_refreshed_when_weights_change(mode):
    m = trained_like(DSConv2d(16, 8, 3, mode=mode)).eval()
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
            (m.kds_scale if mode == "shift" else m.conv.weight).mul_(2)  # what the kernel is computed from

    for change in (
        edit,
        lambda: m.load_state_dict(trained_like(DSConv2d(16, 8, 3, mode=mode), seed=1).state_dict()),
        lambda: m.train().eval(),
        lambda: m.double(),
    ):
        calls.clear()
        change()
        with torch.no_grad():
            m(x.to(m.conv.weight.dtype))
        assert len(calls) == 1
        assert m._eval_kernel().dtype == m.conv.weight.dtype


@pytest.mark.parametrize("mode", MODES)
def test_eval_with_autograd_still_trains(mode):
    """Eval mode with gradients on (e.g. a frozen-BN fine-tune) must not use the detached cache."""
    m = DSConv2d(8, 8, 3, mode=mode).eval()
    m(torch.randn(1, 8, 5, 5)).sum().backward()
    trained = m.kds_scale if mode == "shift" else m.conv.weight
    assert trained.grad is not None and m._cache is None


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


@pytest.mark.parametrize("kwargs", [{}, {"kds_bias": True, "cds": True}, {"mode": "shift", "kds_bias": True}])
def test_fuse_is_exact_and_keeps_the_integer_kernel(kwargs):
    m = trained_like(DSConv2d(24, 16, 3, 2, **kwargs)).eval()
    x = torch.randn(2, 24, 9, 9)
    y = m(x)
    before = m.integer_kernel()
    assert m.fuse() is m and not hasattr(m, "bn")
    assert rel_err(m(x), y) < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(before, m.integer_kernel()))  # still the pre-fuse quantisation


def test_yaml_style_positional_call():
    """YAML rows pass arguments positionally: bits and block_size after act, mode after kds_bias and cds."""
    m = DSConv2d(32, 64, 3, 2, None, 1, 1, True, 2, 16)
    assert m.bits == 2 and m.block_size == 16 and m.mode == "ste"
    assert m(torch.randn(1, 32, 16, 16)).shape == (1, 64, 8, 8)
    assert DSConv2d(32, 64, 3, 2, None, 1, 1, True, 4, 32, False, False, "shift").mode == "shift"
    assert isinstance(DSConv2d(8, 8, 3, act=nn.ReLU()).act, nn.ReLU)


def expand_blocks(t, block_size, width):
    """(c2, n_blocks, k, k) -> (c2, width, k, k): each block's value repeated over its input channels."""
    return t.repeat_interleave(block_size, 1)[:, :width]


def test_shift_mode_trains_only_the_distribution_shifts():
    """The paper's adaptation mode: the integer kernel (VQK) is frozen, the KDS scales (and KDS bias, CDS) train."""
    torch.manual_seed(0)
    m = trained_like(DSConv2d(40, 16, 3, kds_bias=True, cds=True, mode="shift"))
    params = dict(m.named_parameters())
    assert "conv.weight" not in params  # a buffer: Ultralytics' trainer re-enables requires_grad on parameters
    assert {"kds_scale", "kds_bias", "cds_weight", "cds_bias"} <= params.keys()
    q, alpha = quantize_blocks(m.conv.weight, 4, 32)  # VQK and scales start as the float kernel's quantisation
    assert m.vqk.dtype == torch.int8 and torch.equal(m.vqk, q.to(torch.int8))
    torch.testing.assert_close(m.kds_scale.detach(), alpha)
    vqk, weight, scale = m.vqk.clone(), m.conv.weight.clone(), m.kds_scale.detach().clone()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=1e-3)
    x = torch.randn(4, 40, 9, 9)
    m.train()(x).backward(torch.randn(4, 16, 9, 9))
    opt.step()
    assert torch.equal(m.vqk, vqk) and torch.equal(m.conv.weight, weight)
    assert not torch.equal(m.kds_scale, scale)
    kernel = expand_blocks(m.kds_scale, 32, 40) * m.vqk.float() + expand_blocks(m.kds_bias, 32, 40)
    kernel = kernel * m.cds_weight.view(-1, 1, 1, 1)
    for mode in (True, False):
        m.train(mode)
        assert rel_err(m(x), conv_with(m, kernel, x)) < 1e-6
    vqk_out, scale_out, bias_out = m.integer_kernel()
    assert torch.equal(vqk_out, vqk) and torch.equal(scale_out, m.kds_scale) and torch.equal(bias_out, m.kds_bias)
    assert m.size_ratio() == DSConv2d(40, 16, 3, kds_bias=True, cds=True).size_ratio()


def test_switching_modes_keeps_the_kernel():
    torch.manual_seed(0)
    m = trained_like(DSConv2d(40, 16, 3, 2, kds_bias=True, cds=True)).eval()
    x = torch.randn(2, 40, 9, 9)
    y, kernel = m(x), m.dequantized_weight()
    assert m.set_mode("shift") is m and m.mode == "shift"
    assert rel_err(m(x), y) < 1e-6
    with torch.no_grad():
        m.kds_scale.mul_(1.5)  # a trained scale: switching back keeps what shift mode computes
    y_shift, (vqk, scale, _) = m(x), m.integer_kernel()
    m.set_mode("ste")
    assert "conv.weight" in dict(m.named_parameters()) and not hasattr(m, "vqk")
    assert rel_err(m(x), y_shift) < 1e-5
    vqk_ste, scale_ste, _ = m.integer_kernel()  # the shadow weight alpha * q quantises back to q and alpha
    assert torch.equal(vqk_ste, vqk) and torch.allclose(scale_ste, scale, rtol=1e-6, atol=0)
    m.set_mode("ste")  # same mode: nothing changes
    assert not torch.equal(m.dequantized_weight(), kernel)


def test_shift_mode_checkpoints_round_trip():
    m = trained_like(DSConv2d(24, 16, 3, mode="shift", kds_bias=True))
    with torch.no_grad():
        m.kds_scale.mul_(0.9)
    x = torch.randn(2, 24, 7, 7)
    y = m.eval()(x)
    fresh = DSConv2d(24, 16, 3, mode="shift", kds_bias=True)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.eval()(x), y)
    restored = pickle.loads(pickle.dumps(m))
    assert restored.mode == "shift" and torch.equal(restored(x), y)
    with pytest.raises(RuntimeError, match="vqk"):  # an STE layer has no frozen VQK to take
        DSConv2d(24, 16, 3, kds_bias=True).load_state_dict(m.state_dict())


@pytest.mark.parametrize("mode", MODES)
def test_trace_reads_the_weights_not_the_eval_cache(mode):
    """A trace taken while the eval cache is warm must record the kernel's ops, not the cached kernel as a constant."""
    m = trained_like(DSConv2d(16, 16, 3, 2, mode=mode)).eval()
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m(x)
        traced = torch.jit.trace(m, x)
        (m.kds_scale if mode == "shift" else m.conv.weight).mul_(-0.5)
        assert rel_err(traced(x), m(x)) < 1e-6


def test_shift_mode_onnx_parity():
    """The frozen int8 VQK is cast and scaled inside the exported graph."""
    m = trained_like(DSConv2d(16, 24, 3, 2, kds_bias=True, cds=True, mode="shift")).eval()
    for y, expected in onnx_outputs(m, torch.randn(1, 16, 12, 12)):
        assert rel_err(y, expected) < 1e-4


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_convert_from_stock_conv(mode, bits):
    """The converted layer is the stock Conv with its kernel quantised: exactly the stock BN over conv(x, W_q), and
    within the reported kernel error of the stock output. For white-noise input E|conv(x, D)|^2 / E|conv(x, W)|^2 =
    |D|^2 / |W|^2, so the conv's relative error is about the kernel's (1.5x slack); BN scales each channel by at most
    max|gamma / sigma| and SiLU's slope is at most 1.1."""
    stock = random_stock_conv(24, 32, 3, 2)
    m = trained_like(DSConv2d(24, 32, 3, 2, bits=bits, kds_bias=True, cds=True, mode=mode), seed=3)
    message = m.convert_from(stock)
    match = re.fullmatch(rf"{bits}-bit, kernel error (\d\.\d{{3}})", message)
    assert match, message
    w, w_q = stock.conv.weight.detach(), m.dequantized_weight()
    error = ((w_q - w).norm() / w.norm()).item()
    assert abs(float(match[1]) - error) <= 5e-4
    q, alpha = quantize_blocks(w, bits, 32)
    assert torch.allclose(w_q, expand_blocks(alpha, 32, 24) * q, rtol=1e-6, atol=0)  # KDS bias 0, CDS identity
    if mode == "shift":
        assert torch.equal(m.vqk, q.to(torch.int8))
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(m.bn, name), getattr(stock.bn, name)), name
    x = torch.randn(4, 24, 16, 16)
    with torch.no_grad():
        y = m.eval()(x)
        assert rel_err(y, stock.act(stock.bn(F.conv2d(x, w_q, None, 2, 1)))) < 1e-6
        conv_error = F.conv2d(x, w_q - w, None, 2, 1).norm()
        conv_norm = F.conv2d(x, w, None, 2, 1).norm()
        assert conv_error <= 1.5 * error * conv_norm
        bn_scale = (stock.bn.weight / (stock.bn.running_var + stock.bn.eps).sqrt()).abs().max()
        assert (y - stock(x)).norm() <= 1.1 * bn_scale * 1.5 * error * conv_norm


@pytest.mark.parametrize(
    "stock,match",
    [
        (lambda: random_stock_conv(24, 32, 5, 2), r"k=\(5, 5\) vs \(3, 3\)"),
        (lambda: random_stock_conv(16, 32, 3, 2), "c1=16 vs 24"),
        (lambda: random_stock_conv(24, 32, 3, 1), r"s=\(1, 1\) vs \(2, 2\)"),
        (lambda: random_stock_conv(24, 32, 3, 2, p=0), r"p=\(0, 0\) vs \(1, 1\)"),
        (lambda: random_stock_conv(24, 32, 3, 2, p=1, d=2), r"d=\(2, 2\) vs \(1, 1\)"),
        (lambda: fuse_convs(random_stock_conv(24, 32, 3, 2)), "fused"),
    ],
)
def test_convert_from_mismatch_raises(stock, match):
    m = DSConv2d(24, 32, 3, 2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ConversionError, match=match):
        m.convert_from(stock())
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
