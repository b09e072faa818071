"""Train and validate any model with Ultralytics' own trainer and validator, offline-safe defaults included.

``train("saconv", epochs=10)`` is ``YOLO(model).train(...)`` with the model's short name resolved from the package
(:func:`~yolo_convplug.research.variants.resolve_variant`) and the dataset chosen by
:func:`~yolo_convplug.research.data.resolve_data` (explicit > ``$CONVPLUG_COCO128`` > COCO128 > offline ``shapes``),
training from scratch (``pretrained=False``: no weight download) unless ``pretrained=`` names weights. Offline,
Ultralytics' plots fall back to a default font (training with ``plots=True`` and no network does not fail).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .data import resolve_data
from .variants import resolve_variant

DATA_HELP = (
    "data YAML, 'shapes' (synthetic, offline) or 'shapes:train=N,val=N,imgsz=N'; default: $CONVPLUG_COCO128, else "
    "coco128.yaml (downloaded by Ultralytics), else shapes when offline"
)


def parse_overrides(items: list[str]) -> dict:
    """``["epochs=3", "imgsz=64", "name=x"]`` -> ``{"epochs": 3, "imgsz": 64, "name": "x"}`` (Ultralytics' parsing)."""
    from ultralytics.cfg import parse_key_value_pair

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"argument {item!r} is not key=value (Ultralytics train/val arguments, e.g. epochs=10)")
        k, v = parse_key_value_pair(item)
        out[k] = v
    return out


def train(model: str = "yolov8n.yaml", data: str | None = None, **kwargs):
    """Train ``model`` with ``YOLO(model).train``; return Ultralytics' metrics.

    ``model`` is a checkpoint, a model YAML, an Ultralytics built-in name, or the short name of one of our YAMLs
    (``saconv`` -> ``yolov8n-saconv.yaml`` from the package; ``yolo11s-condconv.yaml`` at that scale).
    """
    from ultralytics import YOLO

    kwargs.setdefault("pretrained", False)
    if not str(model).endswith(".pt"):
        model = resolve_variant(str(model)).model
    return YOLO(model).train(data=resolve_data(data), **kwargs)


def val(model: str, data: str | None = None, **kwargs):
    """Validate ``model`` (a trained checkpoint, or a YAML for an untrained sanity run) with Ultralytics' validator.

    Without ``data``, a checkpoint is validated on the dataset it was trained on when that is still on disk.
    """
    from ultralytics import YOLO

    yolo = YOLO(model)
    trained_on = yolo.overrides.get("data") if data is None else None
    data = trained_on if trained_on and Path(trained_on).is_file() else resolve_data(data)
    return yolo.val(data=data, **kwargs)


def train_main(argv: list[str] | None = None) -> int:
    """``scripts/train.py``: train a model given on the command line and print its final mAP."""
    p = argparse.ArgumentParser(
        prog="train",
        description="Train any model YAML (ours, Ultralytics' built-ins or your own) with Ultralytics' trainer.",
        epilog="examples:\n  train.py saconv --data shapes epochs=10 imgsz=160\n  train.py my_model.yaml "
        "--data path/to/data.yaml device=0 batch=32",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        nargs="?",
        default="yolov8n.yaml",
        help="model YAML, checkpoint, Ultralytics name or our short name such as saconv (default yolov8n.yaml)",
    )
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="Ultralytics train arguments, e.g. epochs=10")
    a = p.parse_intermixed_args(argv)
    kw = parse_overrides(a.overrides)
    metrics = train(a.model, kw.pop("data", a.data), **kw)
    if metrics is not None:
        print(f"mAP50 {metrics.box.map50:.4f}  mAP50-95 {metrics.box.map:.4f}  saved to {metrics.save_dir}")
    return 0


def val_main(argv: list[str] | None = None) -> int:
    """``scripts/val.py``: validate a checkpoint given on the command line and print its mAP."""
    p = argparse.ArgumentParser(
        prog="val",
        description="Validate a trained model with Ultralytics' validator.",
        epilog="examples:\n  val.py runs/detect/train/weights/best.pt\n  val.py best.pt --data shapes imgsz=160",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="trained checkpoint (.pt), or a model YAML for an untrained sanity check")
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="Ultralytics val arguments, e.g. imgsz=640")
    a = p.parse_intermixed_args(argv)
    kw = parse_overrides(a.overrides)
    metrics = val(a.model, kw.pop("data", a.data), **kw)
    print(f"mAP50 {metrics.box.map50:.4f}  mAP50-95 {metrics.box.map:.4f}")
    return 0
