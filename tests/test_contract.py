"""The contract every registered module keeps, parametrised over ``yolo_convplug.registry.registered()``.

A module registered anywhere (ours, or one added later) is covered with no edit here; test ids carry its name and
arguments, e.g. ``test_fuse_is_exact_and_idempotent[SAConv2d-16-32-3-2]``. Cases (``module_checks.contract_cases``):
the conv role builds ``cls(16, 16)`` and ``cls(16, 32, 3, 2)`` (``cls(16, 32)`` without ``k, s`` arguments), the
repeat role ``cls(16, 32, 2)``, the keep role ``cls(16)``; a case the constructor rejects with ``ValueError`` (PConv
keeps its channels and stride) is skipped with the module's reason. The stock layer a module stands in for is
Ultralytics' ``Conv`` (``C2f`` for the repeat role) of the same arguments.

What a module's own math must compute is tested against its reference formulation in its own test file.
"""

from __future__ import annotations

import copy
import io
import re
import warnings

import pytest
import torch
import torch.nn as nn
from module_checks import (
    Case,
    contract_cases,
    mean_rel_err,
    norm_rel_err,
    onnx_outputs,
    randomize_,
    rel_err,
    takes_kernel_and_stride,
)

import yolo_convplug  # noqa: F401  (registers the built-in modules)
from yolo_convplug.modules._utils import fuse_convs
from yolo_convplug.registry import ConversionError, registered, replaced_classes

ENTRIES = registered()
CASES = contract_cases(ENTRIES)


cases = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])


def has_fuse(m: nn.Module) -> bool:
    return callable(getattr(m, "fuse", None))


def batchnorms(m: nn.Module) -> list[nn.BatchNorm2d]:
    return [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]


def main_bn(m: nn.Module) -> nn.BatchNorm2d | None:
    """The BatchNorm2d after the module's main computation: ``m.bn``, else the last BatchNorm2d (C2f's ``cv2.bn``)."""
    bn = getattr(m, "bn", None)
    return bn if isinstance(bn, nn.BatchNorm2d) else (batchnorms(m) or [None])[-1]


def loss_weights(y: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """A fixed random projection of the output: a plain ``y.sum()`` barely reaches what precedes a training-mode BN
    (the sum of a normalised output is constant)."""
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))


# --- shape, gradients, modes ---------------------------------------------------------------------------------------


@cases
def test_output_shape_matches_stock_layer(case: Case):
    """Conv(c1, c2, k, s)'s (C2f(c1, c2, n)'s) output shape, finite, in train and eval, down to 1x1 maps."""
    m, stock = case.build(), case.stock()
    for h, w in ((1, 1), (2, 3), (10, 13)):
        x = case.input(h=h, w=w)
        for mode in (True, False):
            y = m.train(mode)(x)
            assert y.shape == stock.train(mode)(x).shape, (h, w, mode)
            assert torch.isfinite(y).all(), (h, w, mode)


@cases
def test_gradients_reach_every_parameter(case: Case):
    """In training every parameter that requires grad gets a finite gradient, non-zero somewhere (a trained-looking
    module: zero-initialised tensors perturbed), and so does the input; in a fresh module every one is connected."""
    m = randomize_(case.build()).train()
    x = case.input().requires_grad_()
    y = m(x)
    (y * loss_weights(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{name}: zero gradient"
    fresh = case.build().train()
    y = fresh(case.input())
    (y * loss_weights(y)).sum().backward()
    assert all(p.grad is not None for p in fresh.parameters() if p.requires_grad)


@cases
def test_train_and_eval_modes(case: Case):
    """Training updates BN's running statistics; eval is deterministic, per sample (an image's output ignores the
    rest of the batch) and changes no state; neither mode writes into its input."""
    m = randomize_(case.build())
    x = case.input(batch=3)
    x0 = x.clone()
    bns = batchnorms(m)
    before = [b.running_mean.clone() for b in bns]
    m.train()
    y_train = m(x)
    assert torch.isfinite(y_train).all()
    assert all(not torch.equal(b.running_mean, r) for b, r in zip(bns, before)), "BN statistics did not update"
    m.eval()
    state = copy.deepcopy(m.state_dict())
    with torch.no_grad():
        y1, y2, single = m(x), m(x), m(x[:1])
    assert torch.equal(y1, y2), "eval is not deterministic"
    assert rel_err(single, y1[:1]) < 1e-5, "in eval an image's output depends on the other images"
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items()), "an eval forward changed the state"
    if bns:
        assert not torch.allclose(y_train, y1), "train and eval modes compute the same (BN batch statistics unused?)"
    assert torch.equal(x, x0), "forward wrote into its input"


# --- deployment: fuse, ONNX, TorchScript ---------------------------------------------------------------------------


@cases
def test_fuse_is_exact_and_idempotent(case: Case):
    """``fuse()`` (Ultralytics calls it before val, predict and export) returns the module, keeps the eval output
    within 1e-5, is a no-op the second time, and the fused module deep-copies (the exporter copies it)."""
    m = randomize_(case.build()).eval()
    if not has_fuse(m):
        pytest.skip(f"{case.name} has no fuse()")
    x = case.input()
    with torch.no_grad():
        before = m(x)
        assert m.fuse() is m
        after = m(x)
        assert rel_err(after, before) < 1e-5
        assert m.fuse() is m
        assert torch.equal(m(x), after), "a second fuse() changed the output"
        assert torch.equal(copy.deepcopy(m)(x), after), "a deep copy of the fused module computes something else"


def deployable(case: Case, fused: bool) -> nn.Module:
    m = randomize_(case.build()).eval()
    if fused:
        if not has_fuse(m):
            pytest.skip(f"{case.name} has no fuse()")
        m.fuse()
    return m


@cases
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_onnx_parity_at_dynamic_batch(case: Case, fused: bool):
    """Exported at batch 2 with a dynamic batch axis, onnxruntime matches PyTorch at batches 1 and 3. At opset 17,
    or at the opset that a module's export error names (deformable convolution: ONNX DeformConv, opset 19)."""
    m = deployable(case, fused)
    try:
        outputs = list(onnx_outputs(m, case.input()))
    except RuntimeError as e:
        needed = re.search(r"export with opset=(\d+)", str(e))
        if needed is None:
            raise
        outputs = list(onnx_outputs(m, case.input(), opset=int(needed[1])))
    for y, expected in outputs:
        assert y.shape == expected.shape
        # a hard gate (ScConv's SRU threshold) may flip where the runtimes round differently: allow 0.1% of elements
        close = torch.isclose(y, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
        assert close.float().mean() > 0.999, (tuple(y.shape), rel_err(y, expected))
        assert mean_rel_err(y, expected) < 1e-4


@cases
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_torchscript_trace_parity(case: Case, fused: bool):
    """``torch.jit.trace`` at batch 2 matches eager at batch 1 and at batch 3 on another map size, and survives a
    save/load round trip."""
    m = deployable(case, fused)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(m, case.input())
    with torch.no_grad():
        for batch, h, w in ((1, 10, 13), (3, 7, 9)):
            x = case.input(batch, h, w, seed=batch + 10)
            y = traced(x)
            assert rel_err(y, m(x)) < 1e-4, tuple(x.shape)
        f = io.BytesIO()
        torch.jit.save(traced, f)
        f.seek(0)
        assert torch.equal(torch.jit.load(f)(x), y), "the saved trace computes something else"


# --- mixed precision -----------------------------------------------------------------------------------------------


@cases
def test_bf16_autocast_forward_and_backward(case: Case):
    """Under CPU bf16 autocast (amp on bf16 hardware) outputs are finite and close in train and eval (on average
    and at their largest), and a training backward gives every parameter a finite gradient."""
    m = randomize_(case.build())
    x = case.input()
    for mode in (True, False):
        ref_model, model = copy.deepcopy(m).train(mode), copy.deepcopy(m).train(mode)
        with torch.no_grad():
            ref = ref_model(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = model(x)
        assert y.shape == ref.shape and torch.isfinite(y).all(), mode
        assert mean_rel_err(y, ref) < 0.05, mode  # bf16 keeps 8 bits of mantissa
        assert rel_err(y.float(), ref) < (0.1 if mode else 0.05), mode  # and no output far off (train: BN in bf16)
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    (y.float() * loss_weights(y)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters() if p.requires_grad)


def fp16_finite(m: nn.Module, x: torch.Tensor) -> tuple[bool, bool]:
    """(forward finite, backward finite) of ``m`` under CPU float16 autocast; backward covers parameters and input."""
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        y = m(x)
    forward = bool(torch.isfinite(y).all())
    (y.float() * loss_weights(y)).sum().backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None] + [x.grad]
    return forward, all(bool(torch.isfinite(g).all()) for g in grads)


@cases
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_float16_autocast_stress_finite_where_conv_is(case: Case, mode: str):
    """float16 autocast with activations of std 100: forward and backward stay finite wherever a plain Conv (C2f)
    of the same shape does (float16 overflows at 65504)."""
    x = case.input(h=12, w=12, scale=100.0)
    forward, backward = fp16_finite(case.build().train(mode == "train"), x)
    stock_forward, stock_backward = fp16_finite(case.stock().train(mode == "train"), x)
    assert forward or not stock_forward, "non-finite forward where the stock layer is finite"
    assert backward or not stock_backward, "non-finite gradients where the stock layer's are finite"


# --- initial scale -------------------------------------------------------------------------------------------------


def bn_input_variance(m: nn.Module, bn: nn.BatchNorm2d, x: torch.Tensor) -> float:
    seen = []
    handle = bn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().float().var().item()))
    try:
        with torch.no_grad():
            m.train()(x)
    finally:
        handle.remove()
    return seen[0]


@cases
def test_fresh_bn_input_variance_like_conv(case: Case):
    """A fresh module feeds its BN inputs of a fresh Conv's (C2f's) variance, within 10x either way: BN's running
    variance then stays at a Conv's scale and fits the float16 checkpoints Ultralytics saves."""
    m, stock = case.build(), case.stock()
    bn = main_bn(m)
    if bn is None:
        pytest.skip(f"{case.name} has no BatchNorm2d")
    x = case.input(batch=4, h=16, w=16)
    ratio = bn_input_variance(m, bn, x) / bn_input_variance(stock, main_bn(stock), x)
    assert 0.1 < ratio < 10, f"BN input variance {ratio:.3g}x a fresh stock layer's"


# --- bad arguments -------------------------------------------------------------------------------------------------

# (argument, bad value) for every module; c2 only where the role has one; n only for the repeat role
BAD_ARGUMENTS = [("c1", 0), ("c1", True), ("c1", "16"), ("c1", 16.0), ("c2", 0), ("c2", -1), ("c2", "64"),
                 ("c2", 64.0), ("c2", [64]), ("c2", True), ("n", -1)]
BAD_CASES = [
    (name, arg, value)
    for name, e in ENTRIES.items()
    for arg, value in BAD_ARGUMENTS
    if arg == "c1" or (arg == "c2" and e.role != "keep") or (arg == "n" and e.role == "repeat")
]


def call_with(entry, **bad):
    """Build ``entry.cls`` positionally as the parser does, with one argument replaced."""
    args = {"c1": 16, "c2": 32, "n": 1}
    names = {"conv": ("c1", "c2"), "repeat": ("c1", "c2", "n"), "keep": ("c1",)}[entry.role]
    return entry.cls(*({**args, **bad}[a] for a in names))


@pytest.mark.parametrize(("name", "arg", "value"), BAD_CASES, ids=[f"{n}-{a}={v!r}" for n, a, v in BAD_CASES])
def test_bad_arguments_raise_valueerror_naming_them(name, arg, value):
    """Zero, negative, string, float, list and bool channel counts (a user's code, not the YAML parser) raise
    ValueError naming the argument and its value."""
    with pytest.raises(ValueError, match=rf"\b{arg}={re.escape(repr(value))} is not valid"):
        call_with(ENTRIES[name], **{arg: value})


@pytest.mark.parametrize("name", [n for n, e in ENTRIES.items() if e.role != "keep"])
def test_c2_none_is_an_error_or_keeps_the_channels(name):
    """``c2=None`` either raises ValueError naming c2 or means ``c2 = c1`` (PConv)."""
    try:
        m = call_with(ENTRIES[name], c2=None)
    except ValueError as e:
        assert re.search(r"\bc2=None is not valid", str(e)), str(e)
        return
    assert m.eval()(torch.zeros(1, 16, 4, 4)).shape == (1, 16, 4, 4)


# --- every width-scaled channel count, tiny maps, batch 1 ---------------------------------------------------------

# width scaling gives multiples of 8 (odd multiples too); the square pairs cover channel-keeping modules
CHANNELS = [(8, 8), (8, 24), (16, 32), (24, 8), (24, 24), (40, 40), (72, 24), (72, 72), (24, 200)]


@pytest.mark.parametrize(("c1", "c2"), CHANNELS, ids=[f"{a}-{b}" for a, b in CHANNELS])
@pytest.mark.parametrize("name", list(ENTRIES))
def test_width_scaled_channels_and_tiny_maps(name, c1, c2):
    """On 1x1..3x3 maps, at stride 1 and 2 (where the module takes a stride), train and eval give the stock
    layer's output shape and finite values; batch 1 works in eval and, from 2x2 maps on, in training."""
    e = ENTRIES[name]
    if e.role == "keep":
        pytest.skip("a channel-keeping module has no c2")
    strides = (1, 2) if e.role == "conv" and takes_kernel_and_stride(e.cls) else (1,)
    for s in strides:
        args = (c1, c2, 3, s) if len(strides) == 2 else (c1, c2, 2) if e.role == "repeat" else (c1, c2)
        case = Case(name, e.cls, e.role, args)
        if s == 1:
            m = case.build()  # skips the test if the module rejects these channels
        else:
            try:
                m = case.cls(*args)
            except ValueError:
                continue  # a module that keeps the resolution (PConv)
        stock = case.stock().eval()
        for hw in (1, 2, 3):
            ref = stock(torch.zeros(1, c1, hw, hw)).shape[1:]
            y = m.train()(torch.randn(2, c1, hw, hw))
            assert y.shape[1:] == ref and torch.isfinite(y).all(), (args, hw)
            with torch.no_grad():
                y = m.eval()(torch.randn(1, c1, hw, hw))
            assert y.shape[1:] == ref and torch.isfinite(y).all(), (args, hw)
        m.train()(torch.randn(1, c1, 4, 4)).sum().backward()  # batch 1 training, 2x2 output maps at s=2


# --- warm start: conversion from the stock layer -------------------------------------------------------------------


def random_stock(case: Case, args: tuple | None = None) -> nn.Module:
    """The stock layer the module replaces, with random weights (its init) and random BN statistics, in eval."""
    cls = replaced_classes(case.cls, case.role)[0]
    from ultralytics.nn.modules import C2f, Conv

    built = case.stock(args) if cls in (Conv, C2f) else cls(*(args or case.stock_args()))
    return randomize_(built, seed=3).eval()


@torch.no_grad()
def scramble_(m: nn.Module, seed: int) -> nn.Module:
    """Overwrite every floating parameter and buffer with random values (BN variances kept positive)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in [*m.named_parameters(), *m.named_buffers()]:
        if t.is_floating_point():
            t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith("running_var") else
                    torch.randn(t.shape, generator=g) * 0.1)
    return m


def converted(case: Case, stock: nn.Module, seed: int = 0) -> tuple[nn.Module, str]:
    if not callable(getattr(case.cls, "convert_from", None)):
        pytest.skip(f"{case.name} has no convert_from: a warm start leaves it fresh")
    if not replaced_classes(case.cls, case.role):
        pytest.skip(f"{case.name} replaces no stock layer")
    m = case.build(seed)
    torch.manual_seed(0)  # the same draws for modules that add noise
    try:
        description = m.convert_from(stock)
    except ConversionError as e:
        pytest.skip(f"{case.name} has no conversion from {type(stock).__name__}: {e}")
    return m.eval(), description


@cases
def test_conversion_from_stock_keeps_its_function(case: Case):
    """``convert_from`` a stock layer with random weights and BN statistics returns a description, and the eval
    output (relative error, Frobenius norms) is

    - within the module's own ``conversion_error`` of the stock layer's (1e-5 where the conversion is exact,
      CondConv/ODConv their stated noise, DSConv2d its quantisation): a regression beyond the promise fails;
    - closer to it than a fresh module's where ``conversion_error`` is None (approximate with no bound: C2f_Faster
      replaces C2f's blocks by its own, so only what surrounds them can carry over);

    and set by the stock layer alone: a module scrambled before conversion computes the same."""
    stock = random_stock(case)
    m, description = converted(case, stock)
    assert isinstance(description, str) and description
    assert hasattr(case.cls, "conversion_error"), (
        f"{case.name} has convert_from but declares no class attribute conversion_error (a float bound or None)")
    bound = case.cls.conversion_error
    assert bound is None or (isinstance(bound, float) and 0 <= bound < 1), f"conversion_error={bound!r}"
    x = case.input(batch=3)
    with torch.no_grad():
        y, ref = m(x), stock(x)
        error = norm_rel_err(y, ref)
        if bound is None:
            fresh = norm_rel_err(randomize_(case.build(seed=2), seed=5).eval()(x), ref)
            assert error < fresh, f"converted error {error:.3g}, fresh {fresh:.3g} ({description})"
        else:
            assert error <= bound, f"converted error {error:.3g} above the promised {bound:g} ({description})"
        other = scramble_(case.build(seed=1), seed=4)
        torch.manual_seed(0)
        other.convert_from(stock)
        assert rel_err(other.eval()(x), y) < 1e-5, "the converted output depends on the module's previous state"


def mismatched_stock_args(case: Case) -> list[tuple]:
    """Stock arguments that differ from the module's geometry in one respect: c1, c2, and n, or k, s, p, g, d and
    the activation (``Conv(c1, c2, k, s, p, g, d, act)``)."""
    args = case.stock_args()
    c1, c2, *rest = args
    out = [(2 * c1, c2, *rest), (c1, 2 * c2, *rest)] if case.role != "keep" else [(2 * c1, 2 * c1)]
    if case.role == "repeat":
        out.append((c1, c2, args[2] + 1))
    elif case.role == "conv" and takes_kernel_and_stride(case.cls):
        k, s = rest
        out += [(c1, c2, k + 2, s), (c1, c2, k, 3 - s if s in (1, 2) else 1), (c1, c2, k, s, k // 2 + 1),
                (c1, c2, k, s, None, 2), (c1, c2, k, s, None, 1, 2), (c1, c2, k, s, None, 1, 1, False)]
    return out


@cases
def test_conversion_from_mismatched_stock_raises(case: Case):
    """A stock layer of another geometry (another scale's checkpoint) or activation, or a fused one (no BN
    statistics to take), raises ConversionError and leaves the layer as it was (fresh). A module may convert one
    such layer only if it then computes that layer's function, within its ``conversion_error`` (SPDConv at scale 2
    takes a dilation-2 Conv exactly)."""
    converted(case, random_stock(case))  # skips modules without a conversion
    bound = case.cls.conversion_error
    for stock in [random_stock(case, args) for args in mismatched_stock_args(case)] + [fuse_convs(random_stock(case))]:
        m = case.build()
        before = copy.deepcopy(m.state_dict())
        try:
            torch.manual_seed(0)
            description = m.convert_from(stock)
        except ConversionError:
            assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items()), "a refused conversion changed it"
            continue
        with torch.no_grad():
            x = case.input(batch=3)
            y, ref = m.eval()(x), stock(x)
            error = norm_rel_err(y, ref) if y.shape == ref.shape else float("inf")
        if bound is None or error > bound:
            pytest.fail(f"converted from a stock layer of another geometry or activation it does not compute "
                        f"(error {error:.3g}, bound {bound}): {stock} ({description})")
