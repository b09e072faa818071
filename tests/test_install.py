"""Installed, not checked out: shipped YAML names resolve from any folder as Ultralytics' own names do, the YOLO26
variants keep YOLO26's head, ``convplug`` lists and dispatches, and (slow) the wheel works in a fresh venv."""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CFG_MODELS, MODEL_YAMLS, ROOT
from ultralytics.nn.tasks import DetectionModel, yaml_model_load

import yolo_convplug
from yolo_convplug.cli import main
from yolo_convplug.integration import ultralytics_roles
from yolo_convplug.model_yaml import rows
from yolo_convplug.swap import load_model_yaml


def _family(path: Path) -> str:
    return path.stem.split("-")[0]


def test_names_resolve_from_any_folder_by_ultralytics_scale_rule(tmp_path, monkeypatch):
    from ultralytics import YOLO

    monkeypatch.chdir(tmp_path)  # nothing here: found in the package's cfg folder
    d = yaml_model_load("yolo11s-condconv.yaml")
    assert d["scale"] == "s" and [i for i, r in enumerate(rows(d)) if r[2] == "CondConv"] == [7, 17, 20]
    model = YOLO("yolov8n-saconv.yaml").model  # the Python API (and the yolo CLI, which calls it)
    assert type(model.model[3]).__name__ == "SAConv2d" and model.yaml["scale"] == "n"
    model = DetectionModel("yolo26n-scconv.yaml", verbose=False)
    assert type(model.model[17]).__name__ == "ScConv" and model.model[1].conv.out_channels == 32  # 128 x 0.25
    assert rows(yaml_model_load("yolov8n.yaml"))[3][2] == "Conv"  # Ultralytics' own names are untouched


def test_a_local_file_of_that_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = yaml.safe_load((CFG_MODELS / "yolov8-saconv.yaml").read_text())
    (tmp_path / "yolov8-saconv.yaml").write_text(yaml.safe_dump({**shipped, "nc": 3}, sort_keys=False))
    assert yaml_model_load("yolov8n-saconv.yaml")["nc"] == 3
    with pytest.raises(FileNotFoundError, match="does not exist"):
        yaml_model_load("elsewhere/yolov8n-saconv.yaml")  # a path names the user's file, never ours
    with pytest.raises(FileNotFoundError, match="yolov8-nosuch.yaml"):
        yaml_model_load("yolov8n-nosuch.yaml")  # Ultralytics' own error


def _header_layers(path: Path) -> list[int]:
    """The layer indices a YAML's header says the module replaces: ``... (layers 3, 5, 7)``."""
    m = re.search(r"\(layers? ([\d, ]+)\)", path.read_text().split("\n\n")[0].replace("\n# ", " "))
    assert m, f"{path.name}: the header does not say which layers the module replaces"
    return [int(i) for i in m[1].split(",")]


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: p.stem)
def test_shipped_yaml_is_its_stock_model_but_the_layers_its_header_names(path):
    """No drift from Ultralytics: every row and key is the stock YAML's except the module of the rows the header
    names, which keep their from-index and repeats and swap a stock module for a registered one of the same role."""
    ours, _ = load_model_yaml(path)
    stock, _ = load_model_yaml(f"{_family(path)}.yaml")
    assert {k: v for k, v in ours.items() if k not in ("backbone", "head", "legacy")} == {
        k: v for k, v in stock.items() if k not in ("backbone", "head")
    }
    layers = _header_layers(path)
    roles, plugins = ultralytics_roles(), yolo_convplug.registered()
    assert len(rows(ours)) == len(rows(stock))
    for i, (a, b) in enumerate(zip(rows(stock), rows(ours))):
        if i not in layers:
            assert a == b, f"layer {i}: {b} differs from the stock {a} but the header does not name it"
        else:
            assert b[:2] == a[:2] and b[2] in plugins and plugins[b[2]].role == roles[a[2]], (i, a, b)


@pytest.mark.parametrize("path", [p for p in MODEL_YAMLS if _family(p) == "yolo26"], ids=lambda p: p.stem)
def test_yolo26_variants_keep_the_end_to_end_head(path):
    """The Detect head is YOLO26's: one-to-one (NMS-free) branch, reg_max 1, non-legacy, the stock head's size."""
    model = DetectionModel(str(path.with_name(path.name.replace("yolo26", "yolo26n", 1))), verbose=False)
    stock = DetectionModel("yolo26n.yaml", verbose=False)
    head, stock_head = model.model[-1], stock.model[-1]
    assert head.one2one_cv2 is not None and head.reg_max == 1 and not type(head).legacy
    assert sum(p.numel() for p in head.parameters()) == sum(p.numel() for p in stock_head.parameters())
    with torch.no_grad():
        y = model.eval()(torch.zeros(1, 3, 64, 64))
    assert (y[0] if isinstance(y, (list, tuple)) else y).shape == (stock.eval()(torch.zeros(1, 3, 64, 64))[0]).shape


def test_convplug_list_shows_modules_and_shipped_yamls(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name, entry in yolo_convplug.registered().items():
        line = next((line for line in out.splitlines() if line.split()[:1] == [name]), "")
        assert entry.role in line.split() and entry.paper in line, (name, line)
    assert "args    [c2, k=3, s=1" in out  # SAConv2d's YAML args, after the inserted c1
    for path in MODEL_YAMLS:
        assert path.name in out


def test_convplug_help_lists_commands_and_dispatches(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(f"  {c} " in out for c in ("list", "swap", "ablate", "bench"))
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "required: command" in capsys.readouterr().err
    for command in ("list", "swap", "ablate", "bench"):  # the wording of each help is not tested, only that it is one
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and out.startswith(f"usage: convplug {command} [-h]"), (command, out)


# --- the evidence: a wheel in a fresh venv outside the checkout --------------------------------------------------


def _run(args, cwd, env, timeout=600) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_from_an_empty_folder(tmp_path, coco128):
    """Build the wheel, install it (no editable checkout) into a venv that borrows this venv's torch and
    Ultralytics, then from an empty folder: names of each family build, ``yolo train`` of a shipped name,
    ``convplug swap`` and ``convplug ablate --help``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", ROOT], tmp_path, env)
    wheel = next((tmp_path / "dist").glob("yolo_convplug-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"yolo_convplug/cfg/models/{p.name}" for p in MODEL_YAMLS} <= names
    assert {"yolo_convplug_autoload.pth", "yolo_convplug_autoload.py"} <= names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env)
                .stdout.strip())  # fmt: skip
    borrowed = Path(torch.__file__).parents[1]  # this venv's site-packages: torch, Ultralytics, ...
    (site / "borrowed.pth").write_text(f"{borrowed}\n")  # appended after the new site-packages: ours wins
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
         tmp_path, env)  # fmt: skip

    work = tmp_path / "empty"
    work.mkdir()
    r = _run([python, "-c", BUILD_BY_NAME, str(ROOT)], work, env)
    assert "ok" in r.stdout.split(), r.stdout

    yolo = "import sys; from ultralytics.cfg import entrypoint; sys.argv[0] = 'yolo'; sys.exit(entrypoint())"
    train = ["train", "model=yolov8n-saconv.yaml", f"data={coco128}", "epochs=1", "imgsz=32", "batch=8",
             "fraction=0.0625", "workers=0", "device=cpu", "plots=False", f"project={tmp_path / 'runs'}", "name=t"]
    r = _run([python, "-c", yolo, *train], work, env)
    assert "SAConv2d" in r.stdout + r.stderr and (tmp_path / "runs" / "t" / "weights" / "best.pt").exists()

    convplug = venv / "bin" / "convplug"
    r = _run([convplug, "swap", "yolo26.yaml", "Conv=SAConv2d", "--scope", "strided"], work, env)
    assert "wrote yolo26n-saconv2d.yaml" in r.stdout and (work / "yolo26n-saconv2d.yaml").exists()
    r = _run([convplug, "ablate", "--help"], work, env)
    assert r.stdout.startswith("usage: convplug ablate [-h]")


BUILD_BY_NAME = """
import sys
from ultralytics.nn.tasks import DetectionModel  # no import of yolo_convplug: the start-up hook does it

for name, layer, module in (("yolov8n-saconv.yaml", 3, "SAConv2d"), ("yolo11n-condconv.yaml", 7, "CondConv"),
                            ("yolo26n-scconv.yaml", 17, "ScConv")):
    m = DetectionModel(name, verbose=False)
    assert type(m.model[layer]).__name__ == module, (name, m.model[layer])
import yolo_convplug
assert yolo_convplug.__file__.startswith(sys.prefix), yolo_convplug.__file__  # the wheel, not the checkout
assert sys.argv[1] not in sys.path, "the checkout is on sys.path"
print("ok")
"""
