"""Research workflow: the shapes dataset, data resolution, ablation (artefacts and resume) and YAML swaps."""

import csv
import hashlib
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import yaml

import yolo_convplug  # noqa: F401  (registers the plug-ins with Ultralytics)
from yolo_convplug import data as data_mod
from yolo_convplug.ablate import ablate, write_results
from yolo_convplug.data import CLASSES, ShapesSpec, make_shapes, resolve_data
from yolo_convplug.swap import SwapError, load_model_yaml, swap_dict, swap_yaml

REPO = Path(__file__).resolve().parents[1]
TINY = "shapes:train=16,val=8,imgsz=64"


def _digest(folder: Path) -> dict:
    """Relative path -> sha256 of every file, with the folder's own absolute path masked in data.yaml."""
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            content = f.read_bytes().replace(str(folder).encode(), b"<root>")
            out[str(f.relative_to(folder))] = hashlib.sha256(content).hexdigest()
    return out


def test_shapes_byte_identical_and_valid(tmp_path):
    a = make_shapes(TINY, root=tmp_path / "a")
    b = make_shapes(TINY, root=tmp_path / "b")
    da, db = _digest(a.parent), _digest(b.parent)
    assert len([k for k in da if k.endswith(".png")]) == 24
    assert da == db
    assert _digest(make_shapes(ShapesSpec(train=16, val=8, imgsz=64, seed=1), root=tmp_path / "a").parent) != da

    cfg = yaml.safe_load(a.read_text())
    assert Path(cfg["path"]) == a.parent and cfg["names"] == dict(enumerate(CLASSES))
    n_objects = 0
    for label in (a.parent / "labels").rglob("*.txt"):
        for line in label.read_text().splitlines():
            c, *box = line.split()
            assert 0 <= int(c) < len(CLASSES) and all(0 < float(v) <= 1 for v in box)
            n_objects += 1
    assert n_objects >= 24  # at least one object per image

    mtime = (a.parent / "images" / "train" / "00000.png").stat().st_mtime_ns
    make_shapes(TINY, root=tmp_path / "a")  # complete: reused, not regenerated
    assert (a.parent / "images" / "train" / "00000.png").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("bad", ["shape", "shapes:train=x", "shapes:foo=3", "shapes:imgsz=8"])
def test_shapes_spec_errors(bad):
    with pytest.raises(ValueError, match="shapes"):
        ShapesSpec.parse(bad)


def test_resolve_data_precedence(monkeypatch, tmp_path, capsys):
    local = tmp_path / "coco128.yaml"
    local.write_text("train: images\nval: images\nnames: {0: person}\n")
    made = []
    monkeypatch.setattr(data_mod, "make_shapes", lambda spec: made.append(spec) or tmp_path / "shapes.yaml")
    monkeypatch.setattr(data_mod, "_local_coco128", lambda: None)

    monkeypatch.setenv("CONVPLUG_COCO128", str(local))
    assert resolve_data("my.yaml") == "my.yaml"  # explicit beats the environment
    assert resolve_data() == str(local.resolve())  # environment beats the default
    monkeypatch.setenv("CONVPLUG_COCO128", str(tmp_path / "missing.yaml"))
    with pytest.raises(FileNotFoundError, match="CONVPLUG_COCO128"):
        resolve_data()

    monkeypatch.delenv("CONVPLUG_COCO128")
    monkeypatch.setattr(data_mod, "is_online", lambda: True)
    assert resolve_data() == "coco128.yaml"  # Ultralytics downloads it
    monkeypatch.setattr(data_mod, "is_online", lambda: False)
    assert resolve_data() == str(tmp_path / "shapes.yaml")
    assert made == ["shapes"]
    assert "offline" in capsys.readouterr().out
    assert resolve_data("shapes:train=4") == str(tmp_path / "shapes.yaml") and made[-1] == "shapes:train=4"


def _runs(out: Path) -> dict:
    return {p.parent.parent.name: p for p in sorted(out.glob("runs/*/seed0/done.json"))}


def test_ablate_artefacts_and_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ablate"
    kw = dict(data=TINY, out=out, epochs=1, imgsz=64, batch=8, workers=0, latency_runs=3)
    monkeypatch.setenv("CONVPLUG_CACHE", str(tmp_path / "cache"))
    rows = ablate(["baseline", "saconv"], **kw)
    assert [r["variant"] for r in rows] == ["yolov8n", "yolov8n-saconv"]
    for r in rows:
        for k in ("params", "gflops", "latency_cpu_ms", "train_s", "mAP50", "mAP50-95"):
            assert math.isfinite(r[k]), (k, r)
        assert r["params"] > 1e6 and r["gflops"] > 0 and r["latency_cpu_ms"] > 0 and r["train_s"] > 0
        assert 0 <= r["mAP50-95"] <= r["mAP50"] <= 1
    assert rows[0]["params"] != rows[1]["params"]  # the variant really is a different model
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["variant"] for t in table] == ["yolov8n", "yolov8n-saconv"]
    md = (out / "results.md").read_text()
    assert "| yolov8n-saconv |" in md and "vs baseline" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[2/2] yolov8n-saconv seed 0 ... training done" in capsys.readouterr().out

    done = _runs(out)
    stamps = {k: p.stat().st_mtime_ns for k, p in done.items()}
    ablate(["baseline", "saconv"], **kw)  # everything finished: both reused
    assert {k: p.stat().st_mtime_ns for k, p in _runs(out).items()} == stamps
    assert capsys.readouterr().out.count("reused") == 2

    done["yolov8n-saconv"].unlink()  # an interrupted run: folder without done.json
    stale = done["yolov8n-saconv"].parent / "stale.txt"
    stale.write_text("left over")
    ablate(["baseline", "saconv"], **kw)
    log = capsys.readouterr().out
    assert "[1/2] yolov8n seed 0 ... reused" in log and "redoing from scratch" in log
    assert not stale.exists() and done["yolov8n-saconv"].exists()
    assert done["yolov8n"].stat().st_mtime_ns == stamps["yolov8n"]
    assert json.loads(done["yolov8n-saconv"].read_text())["row"]["variant"] == "yolov8n-saconv"


def test_results_mean_std_over_seeds(tmp_path):
    rows = [
        {"variant": v, "model": f"{v}.yaml", "seed": s, "params": 3e6, "gflops": g, "latency_cpu_ms": 10.0 + s,
         "latency_gpu_ms": math.nan, "train_s": 60.0, "mAP50": 0.5, "mAP50-95": m}
        for v, g, ms in (("base", 0.5, (0.4, 0.2)), ("var", 0.6, (0.3, 0.3)))
        for s, m in enumerate(ms)
    ]  # fmt: skip
    csv_path, md_path, png_path = write_results(rows, tmp_path, {"epochs": 10})
    md = md_path.read_text()
    assert "| base | 2 |" in md and "0.300 ± 0.141" in md and "10.50 ± 0.71" in md  # mean ± sample std
    assert "| - |" in md and "1.00x" in md and "Settings: epochs=10" in md  # no GPU: '-'
    assert len(list(csv.DictReader(csv_path.open()))) == 4 and png_path.stat().st_size > 10_000


def _rows(d):
    return d["backbone"] + d["head"]


@pytest.mark.parametrize(
    "source, rules, scope, expect",
    [
        ("yolov8.yaml", "Conv=SAConv2d", "strided", {0: "SAConv2d", 1: "SAConv2d", 3: "SAConv2d", 5: "SAConv2d",
                                                    7: "SAConv2d", 16: "SAConv2d", 19: "SAConv2d"}),
        ("yolov8n.yaml", ["C2f=C2f_Faster", "Conv=DSConv2d"], "1-4", {1: "DSConv2d", 2: "C2f_Faster", 3: "DSConv2d",
                                                                       4: "C2f_Faster"}),
        ("yolo11n.yaml", "Conv=CondConv", "head", {17: "CondConv", 20: "CondConv"}),
        ("yolo11.yaml", "C3k2=C2f_Faster", "all", dict.fromkeys((2, 4, 6, 8, 13, 16, 19, 22), "C2f_Faster")),
    ],
)  # fmt: skip
def test_swap_builds_and_keeps_indices(tmp_path, source, rules, scope, expect):
    out = swap_yaml(source, rules, scope=scope, out=tmp_path / "swapped.yaml")
    src, _ = load_model_yaml(source)
    new = yaml.safe_load(out.read_text())
    assert len(_rows(new)) == len(_rows(src))
    for i, (a, b) in enumerate(zip(_rows(src), _rows(new))):
        if i in expect:
            assert b[2] == expect[i] and b[:2] == a[:2], (i, a, b)
        else:
            assert b == a, (i, a, b)

    from ultralytics.nn.tasks import parse_model

    src_model, _ = parse_model({**src, "scale": "n"}, ch=3, verbose=False)
    src_legacy = src_model[-1].legacy
    new_model, _ = parse_model({**new, "scale": "n"}, ch=3, verbose=False)
    assert new_model[-1].legacy == src_legacy  # the yolo11 head is kept even without any C3k2
    assert ("legacy" in new) == (source.startswith("yolo11") and "C3k2" in str(rules))
    # pretrained= transfer: every untouched layer's weights still fit
    sa, sb = src_model.state_dict(), new_model.state_dict()
    untouched = [k for k in sa if int(k.split(".")[0]) not in expect]
    assert untouched and all(k in sb and sb[k].shape == sa[k].shape for k in untouched)


def test_swap_carries_arguments_by_name():
    src, _ = load_model_yaml("yolov8.yaml")
    src["backbone"][0] = [-1, 1, "Conv", [64]]
    d, changes = swap_dict(src, "Conv=SAConv2d", scope="0")
    assert _rows(d)[0] == [-1, 1, "SAConv2d", [64, 1]] and changes == [(0, "Conv", "SAConv2d", [])]  # k=1 kept
    d, changes = swap_dict(load_model_yaml("yolo11n.yaml")[0], "C3k2=C2f_Faster", scope="2,6")
    assert _rows(d)[2][3] == [256, True, 1, 0.25]  # C3k2's implicit shortcut=True made explicit
    assert changes[1] == (6, "C3k2", "C2f_Faster", ["c3k=True"])  # reported as dropped


@pytest.mark.parametrize(
    "rules, scope, match",
    [
        ("C2f=SAConv2d", "all", r"layer 2 \(C2f .*repeat role"),
        ("Conv=C2f_Faster", "3", r"layer 3 \(Conv .*conv role"),
        ("Conv=FasterBlock", "strided", r"layer 0 .*stride"),
        ("Conv=SPPF", "5", r"layer 5 \(SPPF .*differs from the original"),
        ("Conv=NoSuchConv", "all", r"unknown module 'NoSuchConv'"),
        ("Cnv=SAConv2d", "all", r"matched no layer"),
        ("Conv=SAConv2d", "40", r"0\.\.22"),
    ],
)
def test_swap_refuses_naming_the_layer(rules, scope, match):
    with pytest.raises(SwapError, match=match):
        swap_yaml("yolov8.yaml", rules, scope=scope)


def _script(name, *argv):
    """Run scripts/<name>.py in this process (as ``python scripts/<name>.py argv...``)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [name, *map(str, argv)])
        runpy.run_path(str(REPO / "scripts" / f"{name}.py"), run_name="__main__")


def test_cli_help_and_swap(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _script("ablate", "--help")
    text = capsys.readouterr().out
    assert e.value.code == 0 and "CPU" in text and "GPU" in text and "minutes" in text
    out = tmp_path / "y8n-dw.yaml"
    _script("swap", "yolov8.yaml", "Conv=DWConv", "--scope", "head", "-o", out)
    assert "wrote" in capsys.readouterr().out
    assert [r[2] for r in yaml.safe_load(out.read_text())["head"]].count("DWConv") == 2
    with pytest.raises(SystemExit, match="swap refused: layer 2"):
        _script("swap", "yolov8.yaml", "C2f=SAConv2d", "-o", out)
