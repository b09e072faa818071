"""SAConv2d's own math against the naive DetectoRS reference, its start as a Conv of its kernel, checkpoints old and
new, warm start from a stock Conv, and the deformable variant (DetectoRS' published setting).

The generic contract (shapes, gradients to every parameter, fuse, ONNX parity at the default opset, tracing, bf16, BN
input variance of a fresh module) lives in test_contract.py, bad constructor arguments in test_bad_input.py.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ROOT
from module_checks import bf16_forward, bf16_training_grads_finite, bn_eval, random_stock_conv, randomize_, rel_err
from ref_saconv import SAConvNaive, load_from_module, mmcv_pool
from torchvision.ops import deform_conv2d
from ultralytics.nn.modules import Conv
from ultralytics.nn.tasks import DetectionModel, yaml_model_load

from yolo_convplug.modules._utils import fuse_convs
from yolo_convplug.modules.saconv import SAConv2d
from yolo_convplug.registry import ConversionError


def perturbed(m, seed=0):
    """``m`` with BN statistics and affine randomised (``module_checks.randomize_``) and every zero-initialised SAC
    tensor, gamma and beta too (trained-looking)."""
    randomize_(m, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        names = ["weight_diff", "pre_context.weight", "post_context.weight", "switch.weight"]
        for name in names + (["offset.weight"] if m.deform else []):
            p = m.get_parameter(name)
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        m.switch.bias.fill_(0.3)
        m.weight_gamma.mul_(torch.empty_like(m.weight_gamma).uniform_(0.5, 1.5, generator=g))
        m.weight_beta.add_(torch.empty_like(m.weight_beta).normal_(0, 0.01, generator=g))
    return m


# --- the SAC math against the reference ------------------------------------------------------------------------


def assert_matches_reference(m, ref, x, ref_grads=None):
    """``m`` and ``ref`` agree in train and eval: outputs, input gradients and every parameter's gradient
    (``ref_grads`` maps the reference's gradients to the module's parameter names; default: the same names)."""
    ref_grads = ref_grads or (lambda ref: {n: p.grad for n, p in ref.named_parameters()})
    for mode in (True, False):
        m.train(mode), ref.train(mode)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = m(xa), ref(xb)
        assert rel_err(ya, yb) < 1e-5
        g = torch.randn_like(ya)
        ya.backward(g), yb.backward(g)
        assert rel_err(xa.grad, xb.grad) < 1e-4
        grads = ref_grads(ref)
        floor = 1e-2 * max(g.abs().max() for g in grads.values())  # BN zeroes some grads: rounding
        for name, p in m.named_parameters():
            assert rel_err(p.grad, grads[name], floor) < 2e-4, name  # float32 sums over B*H*W
        m.zero_grad(), ref.zero_grad()


def test_matches_naive_reference_outputs_and_gradients():
    """Two explicit F.conv2d (dilation d and 3d), DetectoRS standardisation by autograd: same outputs and grads."""
    torch.manual_seed(0)
    for c1, c2, k, s, hw in [(16, 24, 3, 2, 9), (32, 32, 3, 1, 5), (16, 16, 5, 1, 4), (16, 16, 3, 1, 1)]:
        m = perturbed(SAConv2d(c1, c2, k, s))
        with torch.no_grad():
            m.conv.weight.add_(0.05)  # a non-zero filter mean exercises the standardisation gradient
        assert_matches_reference(m, load_from_module(SAConvNaive(c1, c2, k, s), m), torch.randn(3, c1, hw, hw))


@pytest.mark.parametrize("deform", [False, True])
def test_switch_and_offset_pooling_is_mmcvs_reflect_padding(deform):
    """The switch (and the offsets) see mmcv's reflect-padded 5x5 average on every map with sides >= 3, replicate on
    sides of 1-2 pixels (mixed shapes too): the module equals the mmcv transcription, outputs and gradients, and
    differs from a zero-padded valid-pixel average at the borders (what the pooling was before)."""
    torch.manual_seed(0)
    for hw in [(3, 3), (2, 6), (1, 7), (7, 4), (2, 2), (1, 1)]:
        m = perturbed(SAConv2d(8, 12, 3, 2, deform=deform))
        with torch.no_grad():
            m.switch.weight.mul_(30)  # a switch that varies across the map
            if deform:  # fractional offsets, off the integer grid where bilinear sampling has kinks
                m.offset.bias.uniform_(-1, 1)
        ref = load_from_module(SAConvNaive(8, 12, 3, 2, deform=deform, mmcv_deform_conv=True), m)
        m.double(), ref.double()  # float64: gradients of 2x2 maps cancel to float32 rounding noise
        x = torch.randn(2, 8, *hw, dtype=torch.float64)
        assert_matches_reference(m, ref, x, offset_grads_as_one_conv if deform else None)
    x = torch.randn(2, 8, 9, 9)
    valid_average = F.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
    assert rel_err(mmcv_pool(x)[..., 0, :], valid_average[..., 0, :]) > 0.1  # the border rows differ
    assert rel_err(mmcv_pool(x)[..., 2:-2, 2:-2], valid_average[..., 2:-2, 2:-2]) < 1e-6  # the interior agrees


def test_switch_blends_the_two_dilations():
    """S = 1 gives the dilation-d conv only, S = 0 the dilation-3d conv with W_hat + gamma * dW."""
    m = SAConv2d(8, 8, 3, act=False).eval()
    with torch.no_grad():
        m.weight_diff.normal_(0, 0.2)
    x = torch.randn(1, 8, 11, 11)
    w = m.standardized_weight()

    assert rel_err(m(x), bn_eval(F.conv2d(x, w, None, 1, 1, 1), m.bn)) < 1e-5
    with torch.no_grad():
        m.switch.bias.zero_()
    assert rel_err(m(x), bn_eval(F.conv2d(x, w + m.weight_gamma * m.weight_diff, None, 1, 3, 3), m.bn)) < 1e-5


def test_standardised_weight_has_mean_beta_and_std_gamma_whatever_the_kernel_scale():
    """ConvAWS: ``W_hat`` depends on W only through its per-filter standardisation; its mean is beta, its std gamma
    (W at a scale where the 1e-5 in the std is negligible)."""
    m = perturbed(SAConv2d(16, 8, 3))
    with torch.no_grad():
        m.conv.weight.normal_(5, 3)
    before = m.standardized_weight()
    with torch.no_grad():
        m.conv.weight.mul_(7).add_(3)
    w = m.standardized_weight()
    assert rel_err(w, before) < 1e-4
    assert torch.allclose(w.flatten(1).mean(1), m.weight_beta.flatten(), atol=1e-6)
    assert torch.allclose(w.flatten(1).std(1), m.weight_gamma.flatten(), rtol=1e-3)


def test_one_by_one_input_at_every_stride():
    """The 5x5 switch pooling averages valid pixels only, so a 1x1 map works at every stride."""
    for s in (1, 2, 3):
        m = perturbed(SAConv2d(16, 16, 3, s))
        y = m(torch.randn(2, 16, 1, 1))
        assert y.shape == (2, 16, 1, 1) and torch.isfinite(y).all()


def test_fresh_module_gets_gradients_for_zero_initialised_parameters():
    """At init S = 1 so dW has zero gradient, but every parameter must be connected to the graph."""
    m = SAConv2d(8, 8, 3).train()
    m(torch.randn(2, 8, 6, 6)).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    assert m.switch.weight.grad.abs().sum() > 0  # the switch can start learning


def test_forward_leaves_input_and_padding_untouched():
    m = perturbed(SAConv2d(8, 8, 3, 1, d=2)).eval()
    x = torch.randn(1, 8, 9, 9)
    x0 = x.clone()
    m(x)
    assert torch.equal(x, x0)
    assert m.conv.padding == (2, 2) and m.conv.dilation == (2, 2)


@pytest.mark.parametrize("deform", [False, True])
def test_fuse_is_exact_and_drops_bn(deform):
    for c1, c2, k, s, hw in [(16, 24, 3, 2, 9), (32, 32, 5, 1, 5), (16, 16, 3, 1, 1)]:
        m = perturbed(SAConv2d(c1, c2, k, s, deform=deform)).eval()
        with torch.no_grad():
            m.bn.weight[0] = 0.0  # a pruned channel: the fold must not divide by the BN scale
        x = torch.randn(2, c1, hw, hw)
        y = m(x)
        assert m.fuse() is m and not hasattr(m, "bn")
        assert rel_err(m(x), y) < 1e-5
        assert m.fuse() is m  # idempotent


# --- a fresh module starts as the Conv of its kernel ------------------------------------------------------------


def test_fresh_module_equals_one_converted_from_a_conv_with_its_kernel():
    """W_hat = W at construction: the fresh module is the plain Conv of its kernel, in train and eval."""
    m = SAConv2d(16, 32, 3, 2)
    stock = Conv(16, 32, 3, 2)
    with torch.no_grad():
        stock.conv.weight.copy_(m.conv.weight)
    converted = SAConv2d(16, 32, 3, 2)
    converted.convert_from(stock)
    assert rel_err(m.standardized_weight(), m.conv.weight) < 1e-6
    for name, value in m.state_dict().items():
        assert torch.allclose(value, converted.state_dict()[name], rtol=1e-6, atol=1e-7), name
    x = torch.randn(2, 16, 10, 10)
    for mode in (True, False):
        assert rel_err(m.train(mode)(x), stock.train(mode)(x)) < 1e-5


# --- checkpoints: DetectoRS conversion, this version's, the previous version's ------------------------------------


def test_plain_conv_state_dict_converts_exactly():
    """An Ultralytics Conv's weights load strictly and the SAConv computes what the Conv computed (DetectoRS)."""
    for c1, c2, k, s in [(16, 32, 3, 2), (8, 8, 5, 1)]:
        plain = random_stock_conv(c1, c2, k, s)
        m = perturbed(SAConv2d(c1, c2, k, s))
        m.load_state_dict(plain.state_dict())  # strict
        x = torch.randn(2, c1, 8, 8)
        assert rel_err(m.standardized_weight(), plain.conv.weight) < 1e-5
        assert rel_err(m.eval()(x), plain(x)) < 1e-5
        w = plain.conv.weight.flatten(1)
        assert torch.allclose(m.weight_beta.flatten(), w.mean(1))
        assert torch.allclose(m.weight_gamma.flatten(), (w.var(1) + 1e-5).sqrt())
        assert torch.equal(m.weight_diff, torch.zeros_like(m.weight_diff)) and torch.equal(m.switch.bias, torch.ones(1))


def test_own_state_dict_is_not_converted():
    a, b = perturbed(SAConv2d(8, 16, 3)), SAConv2d(8, 16, 3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weight_gamma, b.weight_gamma) and torch.equal(a.weight_diff, b.weight_diff)
    missing = SAConv2d(8, 16, 3).load_state_dict({"conv.weight": torch.randn(16, 8, 3, 3)}, strict=False)
    assert "bn.weight" in missing.missing_keys and "weight_diff" not in missing.missing_keys


def test_previous_version_state_dict_loads_and_computes_as_before():
    """State dicts saved when gamma started at 1 and beta at 0 keep those buffers and their unit-scale kernel."""
    old = perturbed(SAConv2d(16, 24, 3, 2))
    with torch.no_grad():
        old.weight_gamma.fill_(1.0)
        old.weight_beta.zero_()
    new = SAConv2d(16, 24, 3, 2)
    new.load_state_dict(old.state_dict())  # strict
    assert torch.equal(new.weight_gamma, torch.ones_like(new.weight_gamma))
    assert torch.equal(new.weight_beta, torch.zeros_like(new.weight_beta))
    ref = load_from_module(SAConvNaive(16, 24, 3, 2), old).eval()
    x = torch.randn(2, 16, 9, 9)
    assert rel_err(new.eval()(x), ref(x)) < 1e-5


def test_module_pickled_before_deform_existed_runs():
    """Ultralytics checkpoints pickle whole modules: one saved without the ``deform`` attribute still runs."""
    m = perturbed(SAConv2d(8, 16, 3, 2)).eval()
    x = torch.randn(2, 8, 9, 9)
    y = m(x)
    del m.deform  # what a module pickled by the previous version lacks
    old = pickle.loads(pickle.dumps(m))
    assert "deform" not in vars(old)
    assert torch.equal(old(x), y)
    assert torch.equal(copy.deepcopy(old).fuse()(x), old.fuse()(x))


# --- warm start from a stock Conv -------------------------------------------------------------------------------


@pytest.mark.parametrize("deform", [False, True])
@pytest.mark.parametrize("c1,c2,k,s,d", [(16, 32, 3, 2, 1), (16, 16, 3, 1, 2), (8, 8, 5, 1, 1)])
def test_convert_from_stock_conv_is_exact(c1, c2, k, s, d, deform):
    """Every tensor (and BN's eps/momentum) comes from the stock Conv: the stock output in eval within 1e-5."""
    stock = random_stock_conv(c1, c2, k, s, d=d)
    stock.bn.eps, stock.bn.momentum = 1e-3, 0.03  # what Ultralytics' initialize_weights sets in a model
    m = perturbed(SAConv2d(c1, c2, k, s, d=d, deform=deform))  # trained-looking: everything must be overwritten
    assert isinstance(m.convert_from(stock), str)
    x = torch.randn(2, c1, 11, 10)
    assert rel_err(m.eval()(x), stock(x)) < 1e-5
    assert (m.bn.eps, m.bn.momentum) == (stock.bn.eps, stock.bn.momentum)


@pytest.mark.parametrize(
    "stock,match",
    [
        (Conv(16, 32, 3, 1), r"s=\(1, 1\) vs \(2, 2\)"),
        (Conv(16, 24, 3, 2), r"c2=24 vs 32"),
        (Conv(8, 32, 3, 2), r"c1=8 vs 16"),
        (Conv(16, 32, 5, 2), r"k=\(5, 5\) vs \(3, 3\)"),
        (Conv(16, 32, 3, 2, d=2), r"d=\(2, 2\) vs \(1, 1\)"),
        (Conv(16, 32, 3, 2, g=2), r"g=2 vs 1"),
        (fuse_convs(Conv(16, 32, 3, 2)), r"no conv \+ bn pair"),
    ],
)
def test_convert_from_another_geometry_raises_and_leaves_the_layer(stock, match):
    m = perturbed(SAConv2d(16, 32, 3, 2))
    state = copy.deepcopy(m.state_dict())
    with pytest.raises(ConversionError, match=match):
        m.convert_from(stock)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())


# --- deform=True ------------------------------------------------------------------------------------------------


def test_fresh_deformable_module_equals_the_plain_one():
    """Zero offsets: both deformable branches sample the integer grid, so SAC is unchanged (train and eval)."""
    for c1, c2, k, s, g, d in [(16, 24, 3, 2, 1, 1), (16, 32, 3, 1, 2, 2), (8, 8, 5, 1, 1, 1)]:
        plain = perturbed(SAConv2d(c1, c2, k, s, g=g, d=d))
        deform = SAConv2d(c1, c2, k, s, g=g, d=d, deform=True)
        missing = deform.load_state_dict(plain.state_dict(), strict=False).missing_keys
        assert sorted(missing) == ["offset.bias", "offset.weight"]
        assert not deform.offset.weight.any() and not deform.offset.bias.any()
        x = torch.randn(2, c1, 11, 9)
        for mode in (True, False):
            assert rel_err(deform.train(mode)(x), plain.train(mode)(x)) < 1e-5


def test_deformable_module_matches_sampling_reference_outputs_and_gradients():
    """Non-zero offsets against bilinear sampling by grid_sample with mmcv's two offset convs (offset_s, offset_l)."""
    for c1, c2, k, s, d, hw in [(8, 12, 3, 2, 1, (9, 7)), (8, 8, 3, 1, 2, (8, 10)), (8, 8, 5, 1, 1, (6, 6))]:
        m = perturbed(SAConv2d(c1, c2, k, s, d=d, deform=True))
        with torch.no_grad():
            m.offset.weight.mul_(10)  # offsets of about a pixel: fractional positions, some outside the map
            m.offset.bias.uniform_(-1, 1)
        ref = load_from_module(SAConvNaive(c1, c2, k, s, d, deform=True), m)
        assert_matches_reference(m, ref, torch.randn(2, c1, *hw), offset_grads_as_one_conv)


def offset_grads_as_one_conv(ref):
    """The reference's gradients, its offset_s and offset_l convs joined as the module's one offset conv."""
    grads = {name: p.grad for name, p in ref.named_parameters()}
    for name in ("weight", "bias"):
        grads[f"offset.{name}"] = torch.cat([grads.pop(f"offset_{b}.{name}") for b in "sl"])
    return grads


def test_deformable_offsets_get_gradients_and_learn():
    """From zero offsets, one backward reaches the offset conv and one optimiser step on it changes the output."""
    torch.manual_seed(0)
    m = SAConv2d(8, 8, 3, deform=True)
    x, target = torch.randn(2, 8, 10, 10), torch.randn(2, 8, 10, 10)
    y0 = m.eval()(x)
    F.mse_loss(m.train()(x), target).backward()
    assert m.offset.weight.grad.abs().sum() > 0  # the dilation-d branch's offsets (S = 1 at start)
    torch.optim.SGD(m.offset.parameters(), lr=1.0).step()
    pooled = F.avg_pool2d(x, 5, 1, 2, count_include_pad=False)  # the pre-context is still zero
    assert m.offset(pooled).abs().max() > 0
    assert not torch.allclose(m.eval()(x), y0)


def test_deformable_module_hands_torchvision_finite_offsets_only(monkeypatch):
    """torchvision's deform_conv2d indexes memory with NaN offsets (out-of-bounds reads, a segfault depending on the
    address), and Ultralytics' GFLOPs count runs the model on uninitialised memory (``new_empty``) at every fuse and
    export. Non-finite input must reach the deformable convolutions only as values, never as offsets."""
    import torchvision.ops

    seen = []

    def checked(x, offset, *args):
        seen.append(bool(torch.isfinite(offset).all()))
        return deform_conv2d(x, offset, *args)

    monkeypatch.setattr(torchvision.ops, "deform_conv2d", checked)
    m = SAConv2d(8, 8, 3, deform=True).eval()
    x = torch.randn(2, 8, 9, 9)
    x[0, 0, 4, 4], x[0, 1, 2, 2] = float("nan"), float("inf")
    y = m(x.requires_grad_())
    y.sum().backward()
    assert seen == [True, True]
    assert y[0].isnan().any() and torch.isfinite(y[1]).all()  # NaN propagates within its sample only


def test_deformable_bf16_autocast():
    """torchvision's deform_conv2d has no bfloat16 kernel on CPU: the module runs it in float32 under autocast."""
    m = perturbed(SAConv2d(16, 32, 3, 2, deform=True))
    x = torch.randn(2, 16, 12, 12)
    for mode in (True, False):
        y, ref = bf16_forward(m.train(mode), x)
        assert torch.isfinite(y).all() and rel_err(y.float(), ref) < 0.1
    assert bf16_training_grads_finite(m, x)


def test_deformable_jit_trace():
    m = perturbed(SAConv2d(16, 16, 3, 2, deform=True)).eval()
    x, x2 = torch.randn(2, 16, 10, 10), torch.randn(3, 16, 6, 6)
    for module in (m, copy.deepcopy(m).fuse()):
        traced = torch.jit.trace(module, x)
        assert rel_err(traced(x2), m(x2)) < 1e-5
        torch.jit.save(traced, io.BytesIO())


def _export(module, x, opset, axes=None):
    """ONNX bytes of ``module`` (TorchScript exporter, as Ultralytics uses) with ``axes`` dynamic (default: batch)."""
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), f, dynamo=False, opset_version=opset, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}} if axes is None else axes)
    return f.getvalue()


@pytest.mark.parametrize("fuse", [False, True])
def test_deformable_onnx_opset_19_runs_in_onnxruntime(fuse):
    """Exported as ONNX DeformConv (opset 19) with non-zero offsets: onnxruntime's CPU provider agrees."""
    ort = pytest.importorskip("onnxruntime")
    m = perturbed(SAConv2d(16, 24, 3, 2, deform=True)).eval()
    with torch.no_grad():
        m.offset.weight.mul_(10)
    if fuse:
        m.fuse()
    session = ort.InferenceSession(_export(m, torch.randn(1, 16, 12, 12), 19), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 16, 12, 12)
        with torch.no_grad():
            expected = m(x)
        assert rel_err(torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), expected) < 1e-4


@pytest.mark.parametrize("deform", [False, True])
def test_onnx_with_dynamic_map_size_pools_right_at_every_size(deform):
    """The reflect/replicate pooling has no branch on the map size: one export with dynamic batch, height and width
    (``yolo export dynamic=True``) matches PyTorch at batch 1 and 3 on large, odd, mixed and 1x1/2x2 maps; a
    static export matches at its own size."""
    ort = pytest.importorskip("onnxruntime")
    m = perturbed(SAConv2d(8, 12, 3, 2, deform=deform)).eval()
    with torch.no_grad():
        m.switch.weight.mul_(30)
    axes = {"x": {0: "batch", 2: "h", 3: "w"}, "y": {0: "batch", 2: "ho", 3: "wo"}}
    for fuse in (False, True):
        module = copy.deepcopy(m).fuse() if fuse else m
        dynamic = ort.InferenceSession(_export(module, torch.randn(1, 8, 12, 12), 19, axes),
                                       providers=["CPUExecutionProvider"])
        for batch, hw in [(1, (12, 12)), (3, (7, 9)), (3, (2, 2)), (1, (1, 1)), (3, (2, 5))]:
            x = torch.randn(batch, 8, *hw)
            with torch.no_grad():
                expected = module(x)
            assert rel_err(torch.from_numpy(dynamic.run(None, {"x": x.numpy()})[0]), expected) < 1e-4, (batch, hw)
        for hw in [(2, 2), (6, 6)]:
            static = ort.InferenceSession(_export(module, torch.randn(1, 8, *hw), 19, {}),
                                          providers=["CPUExecutionProvider"])
            x = torch.randn(1, 8, *hw)
            with torch.no_grad():
                expected = module(x)
            assert rel_err(torch.from_numpy(static.run(None, {"x": x.numpy()})[0]), expected) < 1e-4, hw


def test_deformable_onnx_below_opset_19_names_the_limit_and_the_fix():
    m = SAConv2d(8, 8, 3, deform=True).eval()
    with pytest.raises(RuntimeError, match=r"DeformConv\) from opset 19.*opset=19.*deform=False"):
        _export(m, torch.randn(1, 8, 8, 8), 18)


def test_thop_rule_counts_the_deformable_sampling():
    """The deformable layer's MACs: the plain layer's + the offset conv (a module thop counts) + the bilinear
    sampling of k*k*c1 values per output position in each branch, 4 MACs each."""
    thop = pytest.importorskip("thop")
    x = torch.randn(1, 8, 12, 12)

    def macs(m):
        return thop.profile(m, (x,), verbose=False)[0]

    offset_macs = macs(nn.Conv2d(8, 2 * 2 * 9, 3, 2, 1))
    sampling = 2 * 4 * (6 * 6) * 8 * 9
    assert macs(SAConv2d(8, 16, 3, 2, deform=True)) - macs(SAConv2d(8, 16, 3, 2)) == offset_macs + sampling


def test_yaml_row_reaches_deform_positionally():
    """``[c2, k, s, p, g, d, act, deform]``: a YAML row turns DetectoRS' deformable SAC on."""
    d = yaml_model_load(ROOT / "model_yamls" / "yolov8n-saconv.yaml")
    d["backbone"][3] = [-1, 1, "SAConv2d", [256, 3, 2, None, 1, 1, True, True]]
    model = DetectionModel(d, ch=3, nc=80, verbose=False)
    assert model.model[3].deform and not model.model[5].deform
    assert isinstance(model.model[3].offset, nn.Conv2d)
    with torch.no_grad():
        y = model.eval()(torch.zeros(1, 3, 32, 32))[0]
    assert torch.isfinite(y).all()
