"""ScConv: the literal paper reference, shapes for odd channels and Conv options, every width-scaled channel count,
gamma summing to zero, gate semantics, params/FLOPs below the plain conv, GFLOPs with ScConv as layer 0, the refused
kxk conv on one squeezed channel, no warm start from Conv, older state dicts. Generic checks (shape, gradients, fuse,
ONNX, trace, autocast, input left untouched) live in test_contract.py, the BN that fuse keeps in test_deploy.py, bad
constructor arguments in test_bad_input.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from module_checks import randomize_
from ref_scconv import ScConvRef
from torch.utils.flop_counter import FlopCounterMode
from ultralytics.nn.modules.conv import Conv
from ultralytics.nn.tasks import DetectionModel, parse_model
from ultralytics.utils.torch_utils import get_flops

import yolo_convplug
from yolo_convplug.modules.scconv import ScConv
from yolo_convplug.registry import ConversionError
from yolo_convplug.warm_start import convert_layers

MODELS = Path(yolo_convplug.__file__).parent / "cfg" / "models"

YOLO_GRID = [(16, 32, 3, 2), (32, 32, 3, 1), (64, 64, 3, 1), (64, 128, 3, 2), (128, 128, 3, 1), (256, 256, 3, 1),
             (256, 256, 1, 1)]
WIDTHS = list(range(8, 1281, 8))  # every channel count Ultralytics width scaling produces


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def randomize(m: ScConv) -> ScConv:
    """``module_checks.randomize_`` (BN) and positive GN gammas, where |gamma|/sum|gamma| is the paper's
    gamma/sum(gamma)."""
    randomize_(m)
    with torch.no_grad():
        m.gn.weight.uniform_(0.5, 1.5)
        m.gn.bias.uniform_(-0.5, 0.5)
    return m


@pytest.mark.parametrize("c1, c2", [(7, 16), (7, 7), (9, 11), (9, 9), (15, 7)])
@pytest.mark.parametrize("k, s, p, d", [(3, 1, None, 1), (3, 2, None, 1), (1, 2, None, 1), (5, 2, None, 1),
                                        (3, 1, None, 2), (3, 2, 0, 1), (2, 1, None, 1), (6, 2, 2, 1)])
def test_odd_channels_and_conv_options_match_conv_shape(c1, c2, k, s, p, d):
    x = torch.randn(2, c1, 9, 9)
    assert ScConv(c1, c2, k, s, p, 1, d)(x).shape == Conv(c1, c2, k, s, p, 1, d)(x).shape


def test_every_width_scaled_channel_count_works():
    """c1 and c2 independently over 8..1280: every c1 and every c2 against two partners on the meta device (shapes
    and channel bookkeeping are checked by every op, without the cost of real 1280-channel kernels), then real
    numbers for the extremes."""
    pairs = {(c, c) for c in WIDTHS} | set(zip(WIDTHS, WIDTHS[::-1]))  # each c1 and each c2 twice, 8..1280 mixed
    with torch.device("meta"):
        for c1, c2 in sorted(pairs):
            assert ScConv(c1, c2, 3, 2)(torch.empty(1, c1, 3, 3)).shape == (1, c2, 2, 2), (c1, c2)
    for c1, c2 in [(8, 8), (8, 1280), (1280, 8), (40, 1000), (1280, 1280)]:
        y = ScConv(c1, c2, 3, 2)(torch.randn(2, c1, 3, 3))
        assert y.shape == (2, c2, 2, 2) and torch.isfinite(y).all(), (c1, c2)


@pytest.mark.parametrize("k", [1, 3])
def test_params_below_plain_conv_for_all_widths(k):
    """The paper's claim, over the full width-scaling grid (built on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        for c1 in WIDTHS[::5] + [1280]:
            for c2 in WIDTHS[::5] + [1280]:
                assert n_params(ScConv(c1, c2, k)) < n_params(Conv(c1, c2, k)), (c1, c2, k)


@pytest.mark.parametrize("c1, c2, k, s", YOLO_GRID)
def test_params_and_flops_below_plain_conv(c1, c2, k, s):
    m, conv = ScConv(c1, c2, k, s).eval(), Conv(c1, c2, k, s).eval()
    assert n_params(m) < n_params(conv)
    x = torch.randn(1, c1, 20, 20)
    flops = []
    for module in (m, conv):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
        flops.append(counter.get_total_flops())
    assert 0 < flops[0] < flops[1]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("c1, c2, k, s", [(32, 32, 3, 1), (16, 32, 3, 2), (64, 16, 1, 1), (7, 9, 3, 2), (9, 16, 5, 2),
                                          (3, 16, 1, 2), (24, 24, 3, 1)])
def test_matches_literal_reference(c1, c2, k, s, train):
    """Against the full-resolution, split/cat/softmax reading of the paper (float64: the hard gate never flips on
    rounding differences)."""
    torch.manual_seed(0)
    m = ScConv(c1, c2, k, s)
    randomize(m)
    ref = ScConvRef(c1, c2, k, s)
    ref.load_state_dict(m.state_dict())
    m.double().train(train), ref.double().train(train)
    x = torch.randn(3, c1, 11, 11, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("alpha, squeeze, group_size", [(0.25, 2, 2), (0.75, 4, 4), (0.5, 1, 1)])
def test_module_options_match_reference(alpha, squeeze, group_size):
    torch.manual_seed(0)
    m = ScConv(32, 48, 3, 2, alpha=alpha, squeeze=squeeze, group_size=group_size)
    randomize(m)
    ref = ScConvRef(32, 48, 3, 2, alpha=alpha, squeeze=squeeze, group_size=group_size)
    ref.load_state_dict(m.state_dict())
    m.double(), ref.double()
    x = torch.randn(2, 32, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("gamma", ["alternating", "tiny", "zero"])
def test_no_nan_when_gamma_sums_to_zero(gamma):
    """The blog code divides by sum(gamma): +-1 gammas sum to exactly 0 there. Here forward and backward stay finite."""
    m = ScConv(32, 32).train()
    with torch.no_grad():
        g = m.gn.weight
        if gamma == "alternating":
            g.copy_(torch.tensor([1.0, -1.0]).repeat(16).view_as(g))
        elif gamma == "tiny":
            g.copy_(torch.tensor([1e-30, -1e-30]).repeat(16).view_as(g) + 1e-38)
        else:
            g.zero_()
    assert abs(m.gn.weight.sum().item()) < 1e-30
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    y = m(x)
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_gate_threshold_semantics():
    """W >= t is informative: with gamma = 0 every W is exactly sigmoid(0) = 0.5 = t, so the SRU passes X through;
    with a large positive GN bias every W is ~1 (informative) and X also passes; a large negative bias makes every
    position non-informative, so the output is the channel-rotated sigmoid(...)-weighted input."""
    m = ScConv(8, 8)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        m.gn.weight.zero_()
        torch.testing.assert_close(torch.cat(m.sru(x), 1), x)
        m.gn.weight.fill_(1.0)
        m.gn.bias.fill_(1e3)
        torch.testing.assert_close(torch.cat(m.sru(x), 1), x)
        m.gn.bias.fill_(-1e3)  # W = sigmoid(-1e3/8) ~ 0 (< t): X1 = X2 = W*X ~ 0
        assert torch.cat(m.sru(x), 1).abs().max() < 1e-20


def test_gflops_counted_when_scconv_is_layer_0():
    """Ultralytics' get_flops reads the input channels from dim 1 of the model's first parameter: ScConv registers its
    (1, c1, 1, 1) GroupNorm affine first, so a model that starts with ScConv (on a 16-channel input, e.g.
    multispectral: on RGB it is refused, see below) still gets its GFLOPs counted."""
    cfg = {
        "nc": 2,
        "scale": "n",
        "scales": {"n": [0.33, 0.25, 1024]},
        "backbone": [[-1, 1, "ScConv", [64, 3, 2]], [-1, 1, "Conv", [128, 3, 2]]],
        "head": [[[1], 1, "Detect", ["nc"]]],
    }
    model = DetectionModel(cfg, ch=16, verbose=False)
    assert next(model.parameters()).shape == (1, 16, 1, 1)
    assert get_flops(model, 64) > 0


@pytest.mark.parametrize("c1, c2, k, kwargs",
                         [(3, 16, 3, {}), (64, 4, 3, {}), (6, 6, 5, {}), (12, 12, 3, {"squeeze": 4})],
                         ids=["rgb", "narrow-c2", "k5", "squeeze4"])
def test_kxk_conv_on_one_squeezed_channel_is_refused(c1, c2, k, kwargs):
    """Layer 0 on RGB (or any min(c1, c2) whose upper squeeze is one channel): the kxk conv would filter one linear
    mix of the input. Refused naming the narrow side, the width ScConv needs and the fix; the smallest width that
    gives two squeezed channels builds, and so does k = 1 (no kxk conv)."""
    narrow = "c1" if c1 <= c2 else "c2"
    match = (rf"ScConv: {narrow}={min(c1, c2)} is not valid; .*see 1 squeezed channel.*"
             r"needs min\(c1, c2\) >= (\d+) .*keep a stock Conv .*RGB image \(layer 0\)")
    with pytest.raises(ValueError, match=match) as e:
        ScConv(c1, c2, k, **kwargs)
    need = int(re.search(r">= (\d+)", str(e.value)).group(1))
    m = ScConv(need, need, k, **kwargs)
    assert m.gwc.in_channels == m.squeeze1.out_channels == 2
    with pytest.raises(ValueError, match="squeezed channel"):
        ScConv(need - 1, need - 1, k, **kwargs)
    ScConv(c1, c2, 1, **kwargs)


def test_layer_0_on_rgb_names_the_layer_through_yaml():
    cfg = {"nc": 2, "scale": "n", "scales": {"n": [0.33, 0.25, 1024]},
           "backbone": [[-1, 1, "ScConv", [64, 3, 2]]], "head": []}
    with pytest.raises(yolo_convplug.ModelYamlError, match=r"layer 0 .*ScConv could not be built.*c1=3 is not valid"):
        parse_model(cfg, ch=3, verbose=False)


def test_groupnorm_affine_loads_from_older_state_dicts():
    """Checkpoints written while the GN affine was (c1,) load into the (1, c1, 1, 1) parameters, same output."""
    torch.manual_seed(0)
    m = ScConv(16, 32)
    randomize(m)
    old = {k: v.flatten() if k.startswith("gn.") else v for k, v in m.state_dict().items()}
    assert old["gn.weight"].shape == (16,)
    fresh = ScConv(16, 32)
    fresh.load_state_dict(old)
    x = torch.randn(2, 16, 7, 7)
    torch.testing.assert_close(fresh.eval()(x), m.eval()(x), rtol=0, atol=0)
    torch.testing.assert_close(m.gn(x), torch.nn.functional.group_norm(x, m.gn.num_groups, old["gn.weight"],
                                                                        old["gn.bias"], m.gn.eps))


def test_no_conversion_from_conv():
    with pytest.raises(ConversionError, match="no dense kxk kernel"):
        ScConv(16, 32, 3, 2).convert_from(Conv(16, 32, 3, 2))


def test_stock_checkpoint_leaves_scconv_fresh():
    """Loading a stock yolov8n into yolov8n-scconv: every ScConv says it starts fresh, none of its tensors (BN
    statistics included) comes from the replaced Conv, while the other layers load."""
    torch.manual_seed(0)
    stock = randomize_(DetectionModel("yolov8n.yaml", verbose=False))
    model = DetectionModel(str(MODELS / "yolov8n-scconv.yaml"), verbose=False)
    layers = {i: m for i, m in enumerate(model.model) if isinstance(m, ScConv)}
    assert layers and all(isinstance(stock.model[i], Conv) for i in layers)
    lines, prefixes = convert_layers(model, stock)
    assert prefixes == tuple(f"model.{i}." for i in layers)
    assert len(lines) == len(layers)
    assert all(line.startswith(f"layer {i} ScConv: no conversion from Conv, fresh (") for i, line in zip(layers, lines))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.load(stock, verbose=False)
    for i, layer in layers.items():
        assert torch.equal(layer.bn.running_mean, torch.zeros(layer.bn.num_features))
        assert torch.equal(layer.bn.running_var, torch.ones(layer.bn.num_features))
        assert all(torch.equal(v, before[f"model.{i}.{k}"]) for k, v in layer.state_dict().items())
    torch.testing.assert_close(model.model[0].bn.running_var, stock.model[0].bn.running_var)  # a stock layer loads
