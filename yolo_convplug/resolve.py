"""Model-YAML names resolve to the YAMLs shipped in ``yolo_convplug/cfg/models``, as Ultralytics' own names do.

Ultralytics turns a model name into a file in ``yaml_model_load``: ``check_yaml("yolov8n-saconv.yaml", hard=False)``
and then ``check_yaml("yolov8-saconv.yaml")`` (the name without its scale letter; the letter becomes
``d["scale"]``). ``check_yaml`` returns a file of that path if one exists, else searches Ultralytics' own
``cfg`` folder. :func:`patch_yaml_lookup` wraps the ``check_yaml`` that ``ultralytics.nn.tasks`` imported (used
there only by ``yaml_model_load``, which the ``yolo`` CLI, ``YOLO("...yaml")``, ``DetectionModel("...yaml")`` and
the trainer all go through) so that a bare name Ultralytics does not find is looked up in our folder last: a local
file of that name wins, then Ultralytics' own YAMLs, then ours.
"""

from __future__ import annotations

import functools
import types
from pathlib import Path

CFG_MODELS = Path(__file__).resolve().parent / "cfg" / "models"


def shipped_yaml(name: str | Path) -> Path | None:
    """The shipped model YAML called ``name`` (a bare file name such as ``yolov8-saconv.yaml``), else None."""
    name = str(name)
    if Path(name).name != name:  # a path with folders names a file of the user's, never one of ours
        return None
    path = CFG_MODELS / name
    return path if path.is_file() else None


def shipped_yamls() -> list[Path]:
    """Every model YAML shipped with the package, sorted by name."""
    return sorted(CFG_MODELS.glob("*.yaml"))


def patch_yaml_lookup(tasks: types.ModuleType) -> None:
    """Make ``tasks.yaml_model_load`` find the shipped YAMLs by name (idempotent; see the module docstring)."""
    original = getattr(tasks, "check_yaml", None)
    if original is None or getattr(original, "_yolo_convplug", False):
        return

    @functools.wraps(original)
    def check_yaml(file, suffix=(".yaml", ".yml"), hard=True):
        found = original(file, suffix, hard=False)
        if found:
            return found
        ours = shipped_yaml(file)
        if ours is not None:
            return str(ours)
        return original(file, suffix, hard=True) if hard else found  # Ultralytics' own error

    check_yaml._yolo_convplug = True
    tasks.check_yaml = check_yaml
