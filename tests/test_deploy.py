"""Deployment of whole models: ``model.fuse()`` exactness and bf16 for every model YAML, ONNX (onnxruntime) and
TorchScript parity through Ultralytics' exporter for every YOLOv8 variant and one YAML of each other family.
Every registered module is checked on its own (fuse, ONNX, TorchScript, autocast) in tests/test_contract.py.

Models are built at scale n and imgsz 64; their BatchNorms get random statistics and affine parameters, the class
logits a spread around 0 and zero-initialised parameters (SAConv2d's context convs and switch, ...) small random
values, so folding BN and the module-specific paths see values a trained checkpoint would have, not identities.
Outputs are compared as ``max|a - b| / max|a|`` (``module_checks.rel_err``) separately for the decoded boxes and the
class scores of the inference output ``y[0]`` (shape ``(B, 4 + nc, anchors)``).
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import MODEL_YAMLS, family, run_cli, scaled, train_feats
from module_checks import randomize_, rel_err
from ultralytics import YOLO
from ultralytics.nn.modules import Detect
from ultralytics.nn.tasks import DetectionModel

import yolo_convplug  # noqa: F401  (registers the modules even with the start-up hook disabled)
from yolo_convplug.registry import registered

IMGSZ = 64
PLUGINS = tuple(e.cls for e in registered().values())
YOLOV8 = [p for p in MODEL_YAMLS if family(p) == "yolov8"]
# Ultralytics' exporter on every YOLOv8 variant; for each other family (its own head, C2PSA, ...) one YAML,
# the C2f_Faster one where there is one (a C2f subclass, which the exporter treats specially)
OTHER_FAMILIES = sorted({family(p) for p in MODEL_YAMLS} - {"yolov8"})
EXPORTED = YOLOV8 + [
    min((p for p in MODEL_YAMLS if family(p) == f), key=lambda p: (not p.stem.endswith("c2f-faster"), p.stem))
    for f in OTHER_FAMILIES
]
CLI_EXPORTED = [p for p in YOLOV8 if p.stem.endswith(("condconv", "c2f-faster"))]  # per-sample kernels, C2f subclass


# BatchNorms a module keeps by design after fuse(), per instance: ScConv's final BN follows an input-dependent
# softmax mix of two branches, so folding it would not be exact (see ScConv's docstring); every other module folds all.
KEEPS_BN = {"ScConv": 1}


def randomize_model_(model: nn.Module, seed: int = 0) -> nn.Module:
    """``module_checks.randomize_`` plus class logits with a spread around 0 instead of the -9 prior (scores in
    (0.1, 0.9), not ~1e-4)."""
    randomize_(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Detect):
                for branch in m.cv3:
                    bias = branch[-1].bias
                    bias.copy_(torch.rand(bias.shape, generator=g) * 4.0 - 2.0)
    return model


def part_errors(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """``module_checks.rel_err`` of the boxes (rows 0-3) and of the class scores (rows 4-) of ``(B, 4 + nc, A)``
    outputs, relative to the reference."""
    ref, out = torch.as_tensor(ref).float(), torch.as_tensor(out).float()
    assert ref.shape == out.shape, (ref.shape, out.shape)
    return {"boxes": rel_err(out[:, :4], ref[:, :4]), "scores": rel_err(out[:, 4:], ref[:, 4:])}


def plugin_bn_counts(model: DetectionModel) -> dict[str, int]:
    """BatchNorm2d layers inside the model's layers that are our modules, by module class name."""
    counts: dict[str, int] = {}
    for layer in model.model:
        if isinstance(layer, PLUGINS):
            name = type(layer).__name__
            counts[name] = counts.get(name, 0) + sum(isinstance(c, nn.BatchNorm2d) for c in layer.modules())
    return counts


def build(path, seed: int = 0) -> DetectionModel:
    return randomize_model_(DetectionModel(scaled(path), ch=3, nc=80, verbose=False), seed).eval()


def inputs(*batch_sizes: int, h: int = IMGSZ, w: int = IMGSZ) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(b, 3, h, w, generator=g) for b in batch_sizes]


# --- fuse --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: p.stem)
def test_fuse_is_exact_idempotent_and_folds_our_bn(path):
    """``model.fuse()`` (what val/predict/export call) keeps the output within 1e-5 and folds our modules' BN.

    Fusing a fused model is a no-op (the exporter fuses a copy of a model that predict may have fused already),
    a fused model deep-copies (the exporter copies it), in eval an image's output ignores the rest of the batch,
    and forward leaves its input untouched.
    """
    model = build(path)
    x1, x2 = inputs(1, 2)
    x = torch.cat([x1, x2])
    bn_before = plugin_bn_counts(model)
    assert bn_before, f"{path.stem}: no BatchNorm inside our modules"
    with torch.no_grad():
        before = model(x)[0]
        model.fuse(verbose=False)
        after = model(x)[0]
    errors = part_errors(before, after)
    assert max(errors.values()) < 1e-5, errors
    bn_after = plugin_bn_counts(model)
    for name, n in bn_before.items():
        kept = KEEPS_BN.get(name, 0) * sum(type(layer).__name__ == name for layer in model.model)
        assert bn_after[name] == kept, f"{name}: {bn_after[name]} of its {n} BatchNorms left after fuse(), not {kept}"
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == sum(bn_after.values())  # Ultralytics' own

    with torch.no_grad():
        model.fuse(verbose=False)
        twice = model(x)[0]
        copied = copy.deepcopy(model)(x)[0]
        single = model(x1)[0]
    assert torch.equal(twice, after), "a second fuse() changed the output"
    assert torch.equal(copied, after), "a deep copy of the fused model computes something else"
    assert max(part_errors(after[:1], single).values()) < 1e-5, "an image's output depends on the other images"
    assert torch.equal(x[:1], x1), "forward mutated its input"


# --- ONNX and TorchScript through Ultralytics' exporter ----------------------------------------------------------


def save_best_pt(path, file) -> None:
    """Write the YAML's model (random BN statistics) as a trainer's best.pt after ``strip_optimizer``: the fp16
    model (pickled, our classes included) with the metadata keys (``YOLO.save`` cannot: 8.3.0 fails on YAML models)."""
    from ultralytics import __version__

    model = randomize_model_(DetectionModel(scaled(path), ch=3, nc=80, verbose=False))
    ckpt = {"epoch": -1, "best_fitness": None, "model": copy.deepcopy(model).half(), "ema": None, "updates": None}
    torch.save({**ckpt, "optimizer": None, "train_args": {"imgsz": IMGSZ}, "version": __version__}, file)


def exported(path, tmp_path, monkeypatch, fmt: str, **kwargs):
    """Save a best.pt of the YAML's model, load it and export it as ``yolo export`` does; (fused reference, file).

    ONNX at Ultralytics' default opset, or at the opset a module's export error names (deformable convolution in
    DCNv2 and SAConv2d(deform=True): ONNX DeformConv, opset 19), as a user would rerun it."""
    monkeypatch.chdir(tmp_path)  # the exporter writes next to the model file
    save_best_pt(path, tmp_path / "best.pt")
    loaded = YOLO(tmp_path / "best.pt")
    try:
        f = loaded.export(format=fmt, imgsz=IMGSZ, device="cpu", **kwargs)
    except RuntimeError as e:
        needed = re.search(r"export with opset=(\d+)", str(e))
        if fmt != "onnx" or needed is None:
            raise
        f = loaded.export(format=fmt, imgsz=IMGSZ, device="cpu", opset=int(needed[1]), **kwargs)
    reference = copy.deepcopy(loaded.model).float().eval().fuse(verbose=False)  # the fp16-rounded weights
    return reference, f


@pytest.mark.parametrize("path", EXPORTED, ids=lambda p: p.stem)
def test_onnx_export_matches_pytorch_at_dynamic_batch(path, tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    reference, f = exported(path, tmp_path, monkeypatch, "onnx", dynamic=True)
    session = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for x in inputs(1, 3) + inputs(2, h=96):  # batch 1, another batch size, another image shape
        with torch.no_grad():
            ref = reference(x)[0]
        out = session.run(None, {name: x.numpy()})[0]
        errors = part_errors(ref, out)
        assert max(errors.values()) < 1e-4, (tuple(x.shape), errors)


@pytest.mark.parametrize("path", EXPORTED, ids=lambda p: p.stem)
def test_torchscript_export_loads_and_matches(path, tmp_path, monkeypatch):
    reference, f = exported(path, tmp_path, monkeypatch, "torchscript")
    scripted = torch.jit.load(str(f))
    (x,) = inputs(1)
    with torch.no_grad():
        errors = part_errors(reference(x)[0], scripted(x))
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.parametrize("path", YOLOV8, ids=lambda p: p.stem)
def test_channels_last_predict_then_export(path, tmp_path, monkeypatch):
    """The user flow ``model.predict(...); model.export(...)``: Ultralytics' AutoBackend moves the model to
    channels_last (CUDA, and x86 CPUs with oneDNN; the trainer too on CUDA) and fuses it in place, then the
    exporter fuses a copy again. Outputs must match the contiguous model's."""
    monkeypatch.chdir(tmp_path)
    yolo = YOLO(scaled(path))
    randomize_model_(yolo.model).eval()
    (x,) = inputs(2)
    with torch.no_grad():
        ref = yolo.model(x)[0]
        nhwc = copy.deepcopy(yolo.model).to(memory_format=torch.channels_last)
        out = nhwc(x.contiguous(memory_format=torch.channels_last))[0]
    assert max(part_errors(ref, out).values()) < 1e-5
    results = yolo.predict(np.zeros((IMGSZ, IMGSZ, 3), np.uint8), imgsz=IMGSZ, device="cpu")  # 8.4 on x86: NHWC
    assert len(results) == 1
    f = yolo.export(format="torchscript", imgsz=IMGSZ, device="cpu")
    with torch.no_grad():
        errors = part_errors(ref[:1], torch.jit.load(str(f))(x[:1]))
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.slow
@pytest.mark.parametrize("path", CLI_EXPORTED, ids=lambda p: p.stem)
def test_cli_export_of_a_checkpoint(path, tmp_path):
    """``yolo export model=best.pt format=onnx`` in a fresh process (start-up hook only, no import of ours).

    The checkpoint has a trainer's best.pt layout (``save_best_pt``).
    """
    ort = pytest.importorskip("onnxruntime")
    best = tmp_path / "best.pt"
    save_best_pt(path, best)
    result = run_cli(["export", f"model={best}", "format=onnx", f"imgsz={IMGSZ}", "dynamic=True"], cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    onnx_file = tmp_path / "best.onnx"
    assert onnx_file.exists(), (result.stdout + result.stderr)[-3000:]
    reference = YOLO(best).model.float().eval().fuse(verbose=False)  # the fp16-rounded weights the CLI exported
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for x in inputs(1, 3):
        with torch.no_grad():
            errors = part_errors(reference(x)[0], session.run(None, {"images": x.numpy()})[0])
        assert max(errors.values()) < 1e-4, (tuple(x.shape), errors)


# --- mixed precision ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: p.stem)
def test_bf16_autocast_forward_train_and_eval(path):
    """Every YAML runs under CPU bf16 autocast (what amp gives on bf16 hardware) with finite, close outputs."""
    model = build(path)
    (x,) = inputs(2)
    with torch.no_grad():
        ref = model(x)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)[0]
    assert torch.isfinite(out).all()
    errors = part_errors(ref, out)
    assert max(errors.values()) < 0.1, errors  # bf16 keeps 8 bits of mantissa: loose, but catches garbage
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        preds = model(x)
    loss = sum(f.float().square().mean() for f in train_feats(preds))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
