"""Warm start through Ultralytics' own loading (``pretrained=``, ``BaseModel.load``): plug-in layers convert from
the stock layers at their index, report one line each, and checkpoints of the same YAML load unchanged.

The stock checkpoints are written here as the trainer writes them (the float16 model under ``"model"``), with
random weights and BN statistics, so that a conversion that copied nothing, or the wrong thing, shows.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import CFG_MODELS, MODEL_YAMLS, family, run_cli, scaled
from module_checks import randomize_
from ultralytics import __version__
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils import LOGGER

import yolo_convplug  # noqa: F401  (registers the modules even with the start-up hook disabled)
from yolo_convplug.registry import registered

PLUGINS = tuple(e.cls for e in registered().values())
YOLOV8 = [p for p in MODEL_YAMLS if family(p) == "yolov8"]
PREFIX = "yolo-convplug warm start: "


def checkpoint(model: DetectionModel) -> dict:
    """``model`` as a trainer's checkpoint after ``strip_optimizer``: the float16 model and the metadata keys."""
    return {"epoch": -1, "best_fitness": None, "model": copy.deepcopy(model).half(), "ema": None, "updates": None,
            "optimizer": None, "train_args": {}, "version": __version__}


def stock_model(name: str) -> DetectionModel:
    return randomize_(DetectionModel(name, ch=3, nc=80, verbose=False), seed=7)


def plugin_layers(model: DetectionModel) -> dict[int, str]:
    return {i: type(m).__name__ for i, m in enumerate(model.model) if isinstance(m, PLUGINS)}


def load_logged(model: DetectionModel, weights, monkeypatch) -> list[str]:
    """``model.load(weights)`` (what ``pretrained=`` calls); returns the warm-start lines it logged."""
    lines = []
    monkeypatch.setattr(LOGGER, "info", lambda msg, *a, **k: lines.append(str(msg)))
    model.load(weights)
    monkeypatch.undo()
    return [line[len(PREFIX):] for line in lines if line.startswith(PREFIX)]


@pytest.fixture(scope="module")
def yolov8n_pt(tmp_path_factory):
    f = tmp_path_factory.mktemp("stock") / "yolov8n-random.pt"
    torch.save(checkpoint(stock_model("yolov8n.yaml")), f)
    return f


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "outcome"),
    [
        ("condconv", r"CondConv <- Conv: (exact|approximate) \(.+\)"),
        ("scconv", r"ScConv: no conversion from Conv, fresh( \(.+\))?"),
    ],
    ids=["condconv", "scconv"],
)
def test_cli_pretrained_stock_checkpoint_reports_every_plugin_layer(module, outcome, yolov8n_pt, tiny_data, tmp_path):
    """``yolo train model=yolov8n-<module>.yaml pretrained=<stock .pt>`` (a fresh process, start-up hook only)
    prints one warm-start line per plug-in layer: converted where a conversion exists, else fresh."""
    yaml = CFG_MODELS / f"yolov8-{module}.yaml"
    layers = plugin_layers(DetectionModel(scaled(yaml), verbose=False))
    result = run_cli(["train", f"model={scaled(yaml)}", f"pretrained={yolov8n_pt}", f"data={tiny_data}", "epochs=1",
                      "imgsz=32", "batch=2", "workers=0", "device=cpu", "plots=False", "val=False",
                      f"project={tmp_path}", "name=run"])
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    lines = [line.split(PREFIX, 1)[1] for line in out.splitlines() if PREFIX in line]
    assert len(lines) == len(layers), lines
    for i in layers:
        assert any(re.fullmatch(rf"layer {i} {outcome}", line) for line in lines), (i, lines)


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: p.stem)
def test_same_yaml_checkpoint_round_trips_exactly(path, monkeypatch):
    """A checkpoint of the same YAML (resuming, fine-tuning a best.pt) loads every tensor as saved: no conversion,
    no warm-start line, state dicts equal."""
    saved = checkpoint(randomize_(DetectionModel(scaled(path), verbose=False), seed=3))
    model = DetectionModel(scaled(path), verbose=False)
    assert load_logged(model, saved, monkeypatch) == []
    expected = saved["model"].float().state_dict()
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize("path", YOLOV8, ids=lambda p: p.stem)
def test_weights_of_another_scale_name_each_skipped_plugin_layer(path, monkeypatch):
    """yolov8s weights into a yolov8n plug-in model: every plug-in layer is named as left fresh (another shape),
    and keeps its fresh tensors."""
    model = DetectionModel(scaled(path, "n"), verbose=False)
    layers = plugin_layers(model)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    lines = load_logged(model, checkpoint(stock_model("yolov8s.yaml")), monkeypatch)
    assert len(lines) == len(layers), lines
    for i, name in layers.items():
        line = next((line for line in lines if line.startswith(f"layer {i} {name}")), None)
        assert line is not None and "fresh" in line, (i, lines)
        for k, v in model.state_dict().items():
            if k.startswith(f"model.{i}."):
                assert torch.equal(v, fresh[k]), k


def test_a_model_built_from_a_fresh_warm_start_inherits_its_records():
    """Ultralytics 8.3's ``yolo train pretrained=`` warm-starts the YOLO model, then builds the trainer's model from
    it: that copy keeps the warm start's records (so calibration still runs); a checkpoint's pickled model, whose
    records describe an old start, passes none on."""
    yaml = scaled(CFG_MODELS / "yolov8-scconv.yaml")
    first = DetectionModel(yaml, ch=3, nc=80, verbose=False)
    first.load(stock_model("yolov8n.yaml"))
    assert {r["outcome"] for r in first._convplug_warm_start} == {"fresh"}
    copied = DetectionModel(yaml, ch=3, nc=80, verbose=False)
    copied.load(first)
    assert copied._convplug_warm_start == first._convplug_warm_start
    assert copied._convplug_warm_start is not first._convplug_warm_start
    from_checkpoint = DetectionModel(yaml, ch=3, nc=80, verbose=False)
    from_checkpoint.load(checkpoint(first))
    assert not hasattr(from_checkpoint, "_convplug_warm_start")
