"""Shared fixtures: repository paths, the local COCO128 and a runner for fresh Python processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_YAMLS = sorted((ROOT / "model_yamls").glob("*.yaml"))
SHARED_COCO128 = ROOT.parent / "shared" / "datasets" / "coco128" / "coco128.yaml"

# Tests never download: point the data resolution at the local COCO128 unless the caller already did.
if SHARED_COCO128.exists():
    os.environ.setdefault("CONVPLUG_COCO128", str(SHARED_COCO128))


@pytest.fixture(scope="session")
def coco128() -> Path:
    path = Path(os.environ.get("CONVPLUG_COCO128", SHARED_COCO128))
    if not path.exists():
        pytest.skip(f"local COCO128 not found at {path} (set CONVPLUG_COCO128)")
    return path


def run_python(code: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter of this venv (so the start-up hook applies, as for a user)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def run_cli(args: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the ``yolo`` console script of this venv."""
    yolo = Path(sys.executable).with_name("yolo")
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(yolo), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
