"""The real `yolo` CLI on COCO128, then the checkpoint in fresh processes (no import of yolo_convplug anywhere)."""

from __future__ import annotations

import pytest
from conftest import run_cli, run_python

pytestmark = pytest.mark.slow

TRAIN_ARGS = ["epochs=1", "imgsz=64", "batch=16", "workers=0", "device=cpu", "plots=False", "fraction=0.25", "seed=0"]


@pytest.fixture(scope="module")
def best_pt(tmp_path_factory, coco128):
    project = tmp_path_factory.mktemp("runs")
    result = run_cli(
        ["train", "model=model_yamls/yolov8n-saconv.yaml", f"data={coco128}", *TRAIN_ARGS, f"project={project}",
         "name=saconv"]
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    best = project / "saconv" / "weights" / "best.pt"
    assert best.exists(), (result.stdout + result.stderr)[-3000:]
    return best


def test_cli_train_builds_plugin_layers(best_pt):
    code = (f"import torch\nckpt = torch.load(r'{best_pt}', weights_only=False)\n"
            "print(type(ckpt['model'].model[3]).__name__)")
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "SAConv2d"


@pytest.mark.parametrize("safe_load", ["0", "1"])
def test_fresh_process_validates_and_predicts_best_pt(best_pt, coco128, safe_load):
    code = (
        "from ultralytics import YOLO\n"
        f"model = YOLO(r'{best_pt}')\n"
        f"metrics = model.val(data=r'{coco128}', imgsz=64, batch=32, workers=0, plots=False, device='cpu')\n"
        "print('MAP', metrics.box.map50)\n"
        f"results = model.predict(r'{coco128.parent / 'images' / 'train2017'}', imgsz=64, max_det=5, device='cpu')\n"
        "print('PRED', len(results))\n"
        "print('LAYER', type(model.model.model[3]).__name__)\n"
    )
    result = run_python(code, env={"ULTRALYTICS_SAFE_LOAD": safe_load})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    out = result.stdout
    assert 0.0 <= float(out.split("MAP")[1].split()[0]) <= 1.0
    assert int(out.split("PRED")[1].split()[0]) == 128
    assert "LAYER SAConv2d" in out


def test_fresh_process_fine_tunes_best_pt(best_pt, coco128, tmp_path):
    result = run_cli(["train", f"model={best_pt}", f"data={coco128}", *TRAIN_ARGS, f"project={tmp_path}", "name=ft"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert (tmp_path / "ft" / "weights" / "last.pt").exists()
