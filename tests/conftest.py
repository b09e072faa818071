"""Shared fixtures and helpers: repository paths, the model YAMLs, the local COCO128 (and an 8-image subset of it),
runners for fresh Python processes and the ``yolo`` CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CFG_MODELS = ROOT / "yolo_convplug" / "cfg" / "models"
MODEL_YAMLS = sorted(CFG_MODELS.glob("*.yaml"))
SHARED_COCO128 = ROOT.parent / "shared" / "datasets" / "coco128" / "coco128.yaml"

# Tests never download: point the data resolution at the local COCO128 unless the caller already did.
if SHARED_COCO128.exists():
    os.environ.setdefault("CONVPLUG_COCO128", str(SHARED_COCO128))


def family(path: Path) -> str:
    """``yolov8-saconv.yaml`` -> ``yolov8`` (the stock model the YAML derives from)."""
    return path.stem.split("-")[0]


def scaled(path: Path, scale: str = "n") -> str:
    """``.../yolov8-saconv.yaml`` -> ``.../yolov8n-saconv.yaml`` (Ultralytics picks the scale from the name)."""
    f = family(path)
    return str(path.with_name(path.name.replace(f, f + scale, 1)))


def train_feats(preds) -> list:
    """The feature maps of a detection model's training output, whatever its head returns (a list in 8.3, a dict
    with ``feats`` in 8.4, ``one2many``/``one2one`` dicts for YOLO26)."""
    if isinstance(preds, dict):
        return preds["feats"] if "feats" in preds else train_feats(next(iter(preds.values())))
    return list(preds)


@pytest.fixture(scope="session")
def coco128() -> Path:
    path = Path(os.environ.get("CONVPLUG_COCO128", SHARED_COCO128))
    if not path.exists():
        pytest.skip(f"local COCO128 not found at {path} (set CONVPLUG_COCO128)")
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, coco128) -> Path:
    """A data YAML of COCO128's first 8 images and labels (train = val): a real training run in seconds."""
    root = tmp_path_factory.mktemp("tiny_coco")
    src = yaml.safe_load(coco128.read_text())
    images = coco128.parent / src["train"]
    for sub in ("images", "labels"):
        (root / sub).mkdir()
    for image in sorted(images.glob("*.jpg"))[:8]:
        shutil.copy(image, root / "images" / image.name)
        label = Path(str(image.with_suffix(".txt")).replace(f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"))
        if label.exists():
            shutil.copy(label, root / "labels" / label.name)
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images", "val": "images", "names": src["names"]}))
    return data


def run_python(code: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter of this venv (so the start-up hook applies, as for a user)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def run_cli(args: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: int = 900
            ) -> subprocess.CompletedProcess:
    """Run the ``yolo`` console script of this venv."""
    yolo = Path(sys.executable).with_name("yolo")
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(yolo), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def buildable_here(name) -> bool:
    """Whether the installed Ultralytics builds the family of model YAML ``name`` (YOLO26 needs 8.4)."""
    from yolo_convplug.ultralytics_compat import family_minimum, installed_version, parse_version

    need = family_minimum(str(name))
    return need is None or parse_version(installed_version())[: len(need)] >= need


def pytest_collection_modifyitems(config, items):
    """Skip parametrised cases whose model YAML the installed Ultralytics cannot build (the plug-in refuses them with
    'YOLO26 YAMLs need Ultralytics >= 8.4'), so every supported release runs the rest green."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        names = [v for v in params.values() if isinstance(v, (str, Path)) and str(v).endswith((".yaml", ".yml"))]
        names += [v.name for v in params.values() if isinstance(v, Path)]
        too_new = next((n for n in names if not buildable_here(n)), None)
        if too_new is not None:
            item.add_marker(pytest.mark.skip(reason=f"{Path(str(too_new)).name} needs a newer Ultralytics"))
