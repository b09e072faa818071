"""How well a stock checkpoint converts into a plug-in model: per-layer fidelity and mAP before any fine-tuning.

``layer_errors(stock, plugin, images)`` runs the stock model on real images, feeds each plug-in layer (converted by
the warm start, in eval) the input that the stock layer at its index received, and returns
``||y_plugin - y_stock|| / ||y_stock||`` (Frobenius norms over the batch) per converted layer.
``check(weights, models, data)`` does that for every model and validates each converted model with Ultralytics'
validator before any training, next to the stock checkpoint itself.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch

from ..calibrate import DEFAULT_IMAGES, calibrate, layer_io, relative_error
from .checks import ArgumentError, check_local_data, load_weights


def load_images(data: str, n: int = 16, imgsz: int = 160, split: str = "val") -> torch.Tensor:
    """The first ``n`` images of a data YAML's ``split``, resized to ``imgsz`` square, as a float (n, 3, s, s) batch."""
    import cv2
    from ultralytics.data.utils import check_det_dataset

    val = check_det_dataset(data)[split]
    files = sorted(p for p in Path(val).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    images = [cv2.resize(cv2.imread(str(f)), (imgsz, imgsz))[:, :, ::-1] for f in files]
    return torch.from_numpy(np.stack(images).copy()).permute(0, 3, 1, 2).float() / 255


def layer_errors(stock, plugin, images: torch.Tensor) -> dict[int, tuple[str, float]]:
    """Layer index -> (module name, relative error of its output on the stock layer's real input)."""
    from ..registry import registered

    ours = tuple(e.cls for e in registered().values())
    indices = [i for i, m in enumerate(plugin.model) if isinstance(m, ours) and type(m) is not type(stock.model[i])]
    io = layer_io(stock, indices, images)
    return {i: (type(plugin.model[i]).__name__, relative_error(plugin.model[i], *io[i])) for i in indices}


def converted_model(model_yaml: str, stock):
    """``model_yaml`` built with the stock model's classes and warm-started from it (the ``pretrained=`` path)."""
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(model_yaml, nc=len(stock.names), verbose=False)
    model.load(stock)
    model.names = dict(stock.names)
    model.args = getattr(stock, "args", {})
    return model.float().eval()


def validate(model, data: str, imgsz: int) -> float:
    """mAP50-95 of an in-memory model with Ultralytics' validator (on a copy: the validator fuses what it gets)."""
    from ultralytics.models.yolo.detect import DetectionValidator

    validator = DetectionValidator(args=dict(data=data, imgsz=imgsz, batch=16, plots=False, verbose=False, workers=0))
    return float(validator(model=copy.deepcopy(model))["metrics/mAP50-95(B)"])


def check(weights: str, models: list[str], data: str, imgsz: int = 160, with_calibration: bool = False,
          calibrate_steps: int | None = None, calibrate_images: int = DEFAULT_IMAGES, sequential: bool = True,
          seed: int = 0) -> list[dict]:
    """For each model YAML: mAP50-95 after conversion (no training) vs the stock checkpoint's, and layer errors;
    with ``with_calibration`` also after calibrating on the first ``calibrate_images`` training images with
    ``calibrate_steps`` per layer (None: each layer's default, as ``yolo train`` calibrates) (``mAP50-95 calibrated``,
    ``calibration``: the summary lines, ``calibrate_s``: the time it took). ``seed`` seeds torch before each
    model is built, so the plug-in layers' random initialisation (what a conversion leaves) is reproducible."""
    import time

    stock = load_weights(weights, "weights").float().eval()
    images = load_images(data, imgsz=imgsz)
    train_images = load_images(data, calibrate_images, imgsz, "train") if with_calibration else None
    rows = [{"model": Path(weights).name, "mAP50-95": validate(stock, data, imgsz), "layers": {}}]
    for yaml_name in models:
        torch.manual_seed(seed)
        model = converted_model(yaml_name, stock)
        row = {"model": Path(yaml_name).stem, "mAP50-95": validate(model, data, imgsz),
               "layers": layer_errors(stock, model, images)}
        if with_calibration:
            t = time.perf_counter()
            row["calibration"] = calibrate(model, stock, train_images, steps=calibrate_steps, sequential=sequential)
            row["calibrate_s"] = time.perf_counter() - t
            row["mAP50-95 calibrated"] = validate(model, data, imgsz)
            row["layers calibrated"] = layer_errors(stock, model, images)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python scripts/warm_start_check.py stock.pt [model YAMLs] --data D``: print the conversion table (Markdown)."""
    import argparse

    from .variants import resolve_variant, slugs

    p = argparse.ArgumentParser(description="Load a stock checkpoint into plug-in model YAMLs (the pretrained= path) "
                                "and report mAP50-95 before any fine-tuning and each converted layer's relative error "
                                "on the stock model's real activations. About 10 s per model on a 2-core CPU.")
    p.add_argument("weights", help="a stock Ultralytics checkpoint, e.g. a yolov8n best.pt")
    p.add_argument("models", nargs="*", help="model YAMLs (default: every shipped yolov8<scale>-*.yaml)")
    p.add_argument("--data", required=True, help="the data YAML the checkpoint was trained on")
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--scale", default="n")
    p.add_argument("--calibrate", action="store_true",
                   help="also calibrate each model (yolo_convplug.calibrate) as yolo train ... pretrained= does")
    p.add_argument("--calibrate-steps", type=int, default=None,
                   help="Adam steps per layer of --calibrate (a count > 0 implies it; default: each layer's own, "
                   "100 for most, 200 for C2f_Faster)")
    p.add_argument("--calibrate-images", type=int, default=DEFAULT_IMAGES,
                   help=f"training images used by the calibration (default {DEFAULT_IMAGES}, as yolo train uses)")
    p.add_argument("--seed", type=int, default=0, help="torch seed of each model's initialisation (default 0)")
    p.add_argument("--stock-inputs", action="store_true",
                   help="calibrate each layer on the stock layer's inputs instead of the partly calibrated model's")
    a = p.parse_args(argv)
    models = a.models or [resolve_variant(slug, scale=a.scale).model for slug in slugs()]
    try:  # before any work: the data YAML and the weights
        check_local_data(a.data)
        rows = check(a.weights, models, a.data, a.imgsz, a.calibrate or bool(a.calibrate_steps), a.calibrate_steps,
                     a.calibrate_images, not a.stock_inputs, a.seed)
    except ArgumentError as e:
        print(f"warm_start_check: error: {e}", file=sys.stderr)
        return 2
    base = rows[0]["mAP50-95"]

    def vs_stock(m: float) -> str:
        return f"{m / base:.2f}x" if base > 0 else "-"  # a stock model that detects nothing has no ratio

    calibrated = any("calibration" in r for r in rows)
    extra = " calibrated | vs stock | calibration s |" if calibrated else ""
    print(f"| model | mAP50-95 before fine-tuning | vs stock |{extra} converted layers: relative error |")
    print("|---|---:|---:|" + ("---:|---:|---:|" if calibrated else "") + "---|")
    for r in rows:
        layers = ", ".join(f"{i} {n} {e:.1e}" for i, (n, e) in r["layers"].items()) or "-"
        cal = ""
        if calibrated:
            m = r.get("mAP50-95 calibrated", r["mAP50-95"])
            cal = f" {m:.3f} | {vs_stock(m)} | {r.get('calibrate_s', 0.0):.1f} |"
        print(f"| {r['model']} | {r['mAP50-95']:.3f} | {vs_stock(r['mAP50-95'])} |{cal} {layers} |")
    for r in rows:
        for line in r.get("calibration", ()):
            print(f"{r['model']}: {line}")
    return 0
