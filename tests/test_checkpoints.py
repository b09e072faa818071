"""Float16 checkpoints of briefly trained models keep their BN statistics and their function.

Ultralytics saves ``last.pt``/``best.pt`` in float16 (largest value 65504, to which it clamps an overflow). A module
whose BN sees inputs far larger than a Conv's (SAConv2d's first initialisation: ~1000x the variance) ends up with a
``running_var`` at 65504 in a long run, and its saved model computes something else than the trained one. Each
YOLOv8 plug-in YAML (every ``yolov8-*.yaml`` of the package) is trained through Ultralytics for one epoch on 8 COCO128
images at imgsz 32 (four optimiser steps); then its saved checkpoints must

- hold float16 BN statistics that are finite and below 65504;
- have, in every plug-in layer, BN statistics at the scale of the model's own stock layers (within 10x of the
  largest second moment ``running_var + running_mean^2`` among them): a long run then keeps a stock model's float16
  headroom (a brief run cannot reach 65504, but it shows the scale that gets there);
- compute, loaded and cast back to float32, what the trained float32 model computes (up to the float16 rounding
  of the weights).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from conftest import MODEL_YAMLS, family, scaled
from ultralytics import YOLO

import yolo_convplug  # noqa: F401  (registers the modules even with the start-up hook disabled)
from yolo_convplug.registry import registered

pytestmark = pytest.mark.slow

YOLOV8 = [p for p in MODEL_YAMLS if family(p) == "yolov8"]
PLUGINS = tuple(e.cls for e in registered().values())
FP16_MAX = torch.finfo(torch.float16).max


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """``trained(path) -> (in-memory float32 model, {"last": ckpt model, "best": ckpt model})``, trained once per
    YAML in this module (so ``-k`` trains only what it selects)."""
    project = tmp_path_factory.mktemp("runs")
    cache = {}

    def train(path):
        if path not in cache:
            yolo = YOLO(scaled(path))
            yolo.train(data=str(tiny_data), epochs=1, imgsz=32, batch=2, workers=0, device="cpu", plots=False,
                       val=False, seed=0, deterministic=False, project=str(project), name=path.stem, exist_ok=True,
                       verbose=False)
            trainer = yolo.trainer
            saved = {}
            for kind, f in (("last", trainer.last), ("best", trainer.best)):
                ckpt = torch.load(f, map_location="cpu", weights_only=False)
                saved[kind] = ckpt.get("ema") or ckpt["model"]
            cache[path] = (copy.deepcopy(trainer.ema.ema).float().eval(), saved)
        return cache[path]

    return train


def bn_layers(layer: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in layer.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None]


def second_moment(layer: nn.Module) -> float:
    """The largest ``running_var + running_mean^2`` over the BN layers of ``layer`` (0 without BN)."""
    moments = ((b.running_var.float() + b.running_mean.float() ** 2).max().item() for b in bn_layers(layer))
    return max(moments, default=0.0)


@pytest.mark.parametrize("kind", ["last", "best"])
@pytest.mark.parametrize("path", YOLOV8, ids=lambda p: p.stem)
def test_float16_checkpoint_bn_statistics_finite_and_in_range(trained, path, kind):
    _, saved = trained(path)
    model = saved[kind]
    assert next(model.parameters()).dtype == torch.float16, "Ultralytics saves float16 checkpoints"
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            for stat in ("running_mean", "running_var"):
                t = getattr(m, stat)
                assert torch.isfinite(t).all(), f"{name}.{stat} is not finite"
                assert t.abs().max() < FP16_MAX, f"{name}.{stat} reaches float16's largest value {FP16_MAX:g}"


@pytest.mark.parametrize("path", YOLOV8, ids=lambda p: p.stem)
def test_plugin_bn_statistics_at_the_scale_of_stock_layers(trained, path):
    _, saved = trained(path)
    model = saved["last"]
    stock = max(second_moment(layer) for layer in model.model if not isinstance(layer, PLUGINS))
    plugins = {f"{i} {type(layer).__name__}": second_moment(layer)
               for i, layer in enumerate(model.model) if isinstance(layer, PLUGINS)}
    assert plugins, f"{path.stem}: no plug-in layer"
    too_large = {k: round(v, 2) for k, v in plugins.items() if v > 10 * stock}
    assert not too_large, f"BN second moments {too_large} exceed 10x the stock layers' largest ({stock:.3f})"


@pytest.mark.parametrize("kind", ["last", "best"])
@pytest.mark.parametrize("path", YOLOV8, ids=lambda p: p.stem)
def test_float16_checkpoint_computes_what_the_float32_model_does(trained, path, kind):
    """Loaded and cast to float32 (as Ultralytics loads it), the checkpoint's output matches the trained float32
    model's within 1e-2 relative (boxes and class scores separately)."""
    model32, saved = trained(path)
    loaded = copy.deepcopy(saved[kind]).float().eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model32(x)[0], loaded(x)[0]
    for part, r, o in (("boxes", ref[:, :4], out[:, :4]), ("scores", ref[:, 4:], out[:, 4:])):
        error = ((r - o).abs().max() / r.abs().max()).item()
        assert error < 1e-2, f"{part}: relative error {error:.3g}"
