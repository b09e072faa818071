"""Train and validate any model YAML with Ultralytics' own trainer and validator, offline-safe defaults included.

``train("model_yamls/yolov8n-saconv.yaml", epochs=10)`` is ``YOLO(model).train(...)`` with the dataset chosen by
:func:`yolo_convplug.data.resolve_data` (explicit > ``$CONVPLUG_COCO128`` > COCO128 > offline ``shapes``), training
from scratch (``pretrained=False``: no weight download) unless ``pretrained=`` names weights. Offline, Ultralytics'
plots fall back to a default font (checked: training with ``plots=True`` and no network does not fail).
"""

from __future__ import annotations

from .data import resolve_data


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

    ``model`` is a checkpoint, a model YAML, an Ultralytics built-in name, or one of our short names (``saconv``,
    ``c2f-faster``, ... -> ``model_yamls/yolov8n-<name>.yaml``, see :func:`yolo_convplug.ablate.resolve_variant`).
    """
    from ultralytics import YOLO

    from .ablate import resolve_variant

    kwargs.setdefault("pretrained", False)
    if not str(model).endswith(".pt"):
        model = resolve_variant(str(model)).model
    return YOLO(model).train(data=resolve_data(data), **kwargs)


def val(model: str, data: str | None = None, **kwargs):
    """Validate ``model`` (a trained checkpoint, or a YAML for an untrained sanity run) with Ultralytics' validator.

    Without ``data``, a checkpoint is validated on the dataset it was trained on when that is still on disk.
    """
    from pathlib import Path

    from ultralytics import YOLO

    yolo = YOLO(model)
    trained_on = yolo.overrides.get("data") if data is None else None
    data = trained_on if trained_on and Path(trained_on).is_file() else resolve_data(data)
    return yolo.val(data=data, **kwargs)
