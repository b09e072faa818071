"""Research tools: variants from the shipped YAMLs, the report (protocol, noise, checkpoint check, plot), the
ablation end to end (artefacts, progress, resume, fine-tuning) and the module bench."""

import csv
import json
import math
import shutil
from types import SimpleNamespace

import matplotlib
import pytest

from yolo_convplug.research import ablate as ablate_mod
from yolo_convplug.research import bench, plan, variants, workflow
from yolo_convplug.research.ablate import EpochWatch, ablate
from yolo_convplug.research.report import Protocol, checkpoint_gap, write_results
from yolo_convplug.research.variants import default_variants, resolve_variant

TINY = "shapes:train=16,val=8,imgsz=64"


# --- variants -------------------------------------------------------------------------------------------------------


def test_variants_discovered_from_cfg_folder(tmp_path, monkeypatch):
    shutil.copy(variants.CFG_MODELS / "yolov8-saconv.yaml", tmp_path / "yolov8-newconv.yaml")
    shutil.copy(variants.CFG_MODELS / "yolo11-saconv.yaml", tmp_path / "yolo11-other.yaml")
    monkeypatch.setattr(variants, "CFG_MODELS", tmp_path)
    assert default_variants() == ["baseline", "newconv"]  # a new YAML appears with no code edit
    assert default_variants("yolo11") == ["baseline", "other"]
    v = resolve_variant("newconv", scale="s")
    assert v.name == "yolov8s-newconv" and v.model == str(tmp_path / "yolov8s-newconv.yaml")
    with pytest.raises(ValueError, match="family='yolo26' has no model YAMLs"):
        default_variants("yolo26")


def test_short_names_resolve_from_the_package(tmp_path):
    from ultralytics.nn.tasks import yaml_model_load

    for spec, family, scale, name, yaml_scale in [
        ("saconv", "yolov8", "n", "yolov8n-saconv", "n"),
        ("c2f-faster", "yolo11", "s", "yolo11s-c2f-faster", "s"),
        ("yolo11m-condconv.yaml", "yolov8", "n", "yolo11m-condconv", "m"),  # a scaled name of ours
    ]:
        v = resolve_variant(spec, family, scale)
        assert v.name == name and v.model.startswith(str(variants.CFG_MODELS))
        d = yaml_model_load(v.model)  # builds from the package, not a checkout's model_yamls/
        assert d["scale"] == yaml_scale and d["backbone"]
    assert resolve_variant("baseline", "yolo26").model == "yolo26n.yaml"
    assert resolve_variant("yolo11n.yaml").model == "yolo11n.yaml"  # Ultralytics' own, unchanged
    # a scaled YAML of the user's, in a folder: named by its file, built from that folder, not from the package
    own = tmp_path / "yolov8-odconv-anneal.yaml"
    shutil.copy(variants.CFG_MODELS / "yolov8-odconv.yaml", own)
    v = resolve_variant(str(tmp_path / "yolov8n-odconv-anneal.yaml"))
    assert v == variants.Variant("yolov8n-odconv-anneal", str(tmp_path / "yolov8n-odconv-anneal.yaml"))
    assert yaml_model_load(v.model)["scale"] == "n"
    with pytest.raises(ValueError, match="'sacon' is not 'baseline', a yolov8 slug .*saconv"):
        resolve_variant("sacon")
    with pytest.raises(ValueError, match="scale='q'"):
        resolve_variant("saconv", scale="q")


def test_workflow_train_resolves_short_names(monkeypatch, tmp_path):
    import ultralytics

    seen = {}

    class FakeYOLO:
        def __init__(self, model):
            seen["model"] = model

        def train(self, **kw):
            seen.update(kw)

    monkeypatch.setattr(ultralytics, "YOLO", FakeYOLO)
    workflow.train("condconv", data="my.yaml", epochs=1)
    assert seen == {"model": str(variants.CFG_MODELS / "yolov8n-condconv.yaml"), "data": "my.yaml", "epochs": 1,
                    "pretrained": False}  # fmt: skip


# --- report ---------------------------------------------------------------------------------------------------------


def _row(variant, seed, map5095, in_training=None, latency=10.0, gflops=0.5):
    return {
        "variant": variant, "model": f"{variant}.yaml", "seed": seed, "params": 3e6, "gflops": gflops,
        "latency_cpu_ms": latency, "latency_gpu_ms": math.nan, "train_s": 60.0, "mAP50": 0.9, "mAP50-95": map5095,
        "best_epoch": 3, "mAP50-95_train": map5095 if in_training is None else in_training,
    }  # fmt: skip


def _table(md: str) -> dict:
    """variant -> {column: cell} of the markdown table."""
    lines = [line for line in md.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = ([c.strip() for c in x.strip("|").split("|")] for x in lines[2:])
    return {cells[0]: dict(zip(head, cells)) for cells in rows}


@pytest.fixture
def figures(monkeypatch):
    """The suptitle, labels and error bars of every figure the report saves."""
    from matplotlib.figure import Figure

    saved, original = [], Figure.savefig

    def savefig(fig, *args, **kwargs):
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.texts]
        bars = [c for c in ax.containers if isinstance(c, matplotlib.container.ErrorbarContainer) and c.lines[2]]
        lines = [(list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines]
        hlines = [y[0] for x, y in lines if x == [0, 1] and len(set(y)) == 1]  # axhline: axes x from 0 to 1
        vlines = [x[0] for x, y in lines if y == [0, 1] and len(set(x)) == 1]
        bands = [(p.get_bbox().y0, p.get_bbox().y1) for p in ax.patches if p.get_bbox().width > 0]
        saved.append(SimpleNamespace(title=fig._suptitle.get_text(), labels=labels, bars=len(bars), hlines=hlines,
                                     vlines=vlines, bands=bands))  # fmt: skip
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def test_report_protocol_scratch_vs_pretrained(tmp_path, figures):
    rows = [_row("yolov8n", 0, 0.50), _row("yolov8n-saconv", 0, 0.55)]
    scratch = Protocol("shapes", 20, 160, (0,))
    md = write_results(rows, tmp_path / "a", scratch)[1].read_text()
    assert md.startswith("# Ablation: shapes, 20 epochs, imgsz 160, seed 0, from scratch")
    assert figures[-1].title.startswith("shapes, 20 epochs, imgsz 160, seed 0, from scratch")

    tuned = Protocol("coco128.yaml", 5, 320, (0,), pretrained=str(tmp_path / "w" / "best.pt"))
    md = write_results(rows, tmp_path / "b", tuned)[1].read_text()
    assert "fine-tuned from best.pt" in md.splitlines()[0] and f"Weights: {tmp_path / 'w' / 'best.pt'}" in md
    assert "fine-tuned from best.pt" in figures[-1].title and "coco128.yaml, 5 epochs, imgsz 320" in figures[-1].title
    # the plot: short labels with the change against the baseline, the baseline as a reference line
    assert figures[-1].labels == ["yolov8n (baseline)", "saconv +10.0%"]
    assert figures[-1].hlines == [0.50] and figures[-1].vlines == [10.0]  # the baseline's reference lines
    assert figures[-1].bars == 0 and figures[-1].bands == []  # one seed, spread not measured: neither
    assert "1 seed" in figures[-1].title and "seed spread not measured" in figures[-1].title


def test_single_seed_plot_draws_the_protocol_spread_around_the_baseline(tmp_path, figures):
    rows = [_row("yolov8n", 0, 0.50), _row("yolov8n-saconv", 0, 0.55)]
    write_results(rows, tmp_path, Protocol("shapes", 20, 160, (0,), seed_spread=0.092))
    (low, high), = figures[-1].bands  # the first panel's band: baseline ± the measured spread
    assert (low, high) == (pytest.approx(0.50 - 0.092), pytest.approx(0.50 + 0.092))
    assert "1 seed" in figures[-1].title and figures[-1].bars == 0


def test_report_same_images_and_single_seed_noise(tmp_path):
    rows = [_row("yolov8n", 0, 0.50), _row("yolov8n-saconv", 0, 0.52)]
    md = write_results(rows, tmp_path, Protocol("coco128.yaml", 20, 160, (0,), same_images=True))[1].read_text()
    assert "coco128.yaml validates on its training images" in md and "not how it generalises" in md
    assert "One seed: a difference from the baseline smaller than the seed spread is not evidence" in md
    assert "not measured: rerun with --seeds 0 1 2" in md and "beyond spread" not in md
    md = write_results(rows, tmp_path, Protocol("shapes", 20, 160, (0,), same_images=False, seed_spread=0.031))[1]
    text = md.read_text()
    assert "training images" not in text
    assert "seed spread (std of mAP50-95 over seeds, pooled over the default variants) is 0.031" in text


def test_report_several_seeds_marks_beyond_spread(tmp_path, figures):
    maps = {"yolov8n": (0.50, 0.52), "yolov8n-a": (0.60, 0.62), "yolov8n-b": (0.45, 0.60), "yolov8n-c": (0.52, 0.54)}
    rows = [_row(v, s, m, latency=10 + s) for v, ms in maps.items() for s, m in enumerate(ms)]
    md = write_results(rows, tmp_path, Protocol("shapes", 20, 160, (0, 1)))[1].read_text()
    table = _table(md)

    def std(xs):  # sample std, written out
        mean = sum(xs) / len(xs)
        return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))

    base = maps["yolov8n"]
    for v, ms in maps.items():
        assert table[v]["mAP50-95"] == f"{sum(ms) / 2:.3f} ± {std(ms):.3f}"
        if v != "yolov8n":
            beyond = abs(sum(ms) / 2 - sum(base) / 2) > std(ms) + std(base)
            assert table[v]["beyond spread"] == ("yes" if beyond else "no")
    assert [table[v]["beyond spread"] for v in maps] == ["-", "yes", "no", "no"]  # the data really has both cases
    assert "Beyond spread: |mean - baseline mean| > std + baseline std" in md and "One seed" not in md
    assert figures[-1].bars == 4 and figures[-1].title.startswith("shapes, 20 epochs, imgsz 160, seeds 0, 1, from")


def test_fine_tuned_report_pairs_seeds_and_compares_with_the_control(tmp_path):
    """Fine-tuned: per-seed differences from the baseline (the same seed, the same start), beyond spread on them,
    and beyond control: its band clear of the control's (the variant that computes exactly the stock layer)."""
    maps = {
        "yolov8n": (0.50, 0.60, 0.70),
        "yolov8n-control": (0.505, 0.603, 0.707),  # the protocol's own bias: +0.005 ± 0.002
        "yolov8n-a": (0.52, 0.62, 0.72),  # +0.02 every seed: far inside the unpaired spread, beyond both here
        "yolov8n-b": (0.506, 0.604, 0.706),  # +0.0053: paired-consistent, but no larger than the control's
        "yolov8n-c": (0.55, 0.55, 0.75),  # +0.05, -0.05, +0.05: inside its own spread
    }
    rows = [_row(v, s, m) for v, ms in maps.items() for s, m in enumerate(ms)]
    tuned = Protocol("shapes", 10, 160, (0, 1, 2), pretrained=str(tmp_path / "stock.pt"))
    md = write_results(rows, tmp_path, tuned)[1].read_text()
    table = _table(md)

    def paired(v):
        d = [a - b for a, b in zip(maps[v], maps["yolov8n"])]
        mean = sum(d) / 3
        return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / 2)

    (mc, sc) = paired("yolov8n-control")
    for v in maps:
        if v == "yolov8n":
            assert table[v]["paired diff"] == table[v]["beyond spread"] == table[v]["beyond control"] == "-"
            continue
        m, sd = paired(v)
        assert table[v]["paired diff"] == f"{m:+.3f} ± {sd:.3f}"
        assert table[v]["beyond spread"] == ("yes" if abs(m) > sd else "no")
        if v != "yolov8n-control":
            assert table[v]["beyond control"] == ("yes" if abs(m) - sd > abs(mc) + sc else "no")
    assert [table[v]["beyond spread"] for v in maps] == ["-", "yes", "yes", "yes", "no"]
    assert [table[v]["beyond control"] for v in maps] == ["-", "-", "yes", "no", "no"]
    assert "Paired: per seed" in md and "yolov8n-control goes through the same warm start" in md
    # without the control the table says the bias is not measured, and has no control column
    md = write_results([r for r in rows if r["variant"] != "yolov8n-control"], tmp_path / "nc", tuned)[1].read_text()
    assert "beyond control" not in _table(md)["yolov8n-a"] and "the protocol's own bias is not measured" in md


def test_the_control_is_a_default_variant_only_when_fine_tuning():
    assert "control" not in default_variants() and default_variants()[0] == "baseline"
    assert default_variants(control=True) == ["baseline", *variants.slugs()]  # control among them


def test_checkpoint_check_flags_a_mismatch(tmp_path):
    assert checkpoint_gap(0.339, 0.577)[1] and checkpoint_gap(0.339, 0.577)[0] == pytest.approx(0.339 / 0.577 - 1)
    assert not checkpoint_gap(0.571, 0.577)[1]  # within 2 %
    assert checkpoint_gap(0.0004, 0.0)[1] is False  # invisible at 3 decimals
    assert checkpoint_gap(0.5, math.nan) == (pytest.approx(math.nan, nan_ok=True), False)
    rows = [_row("yolov8n", 0, 0.60), _row("yolov8n-saconv", 0, 0.339, in_training=0.577)]
    md = write_results(rows, tmp_path, Protocol("shapes", 20, 160, (0,)))[1].read_text()
    table = _table(md)
    assert table["yolov8n"]["best.pt vs in-training"] == "+0.0% ok"
    assert table["yolov8n-saconv"]["best.pt vs in-training"] == "-41.2% MISMATCH"
    assert "MISMATCH (yolov8n-saconv)" in md
    with open(tmp_path / "results.csv") as f:
        assert [r["mAP50-95_train"] for r in csv.DictReader(f)] == ["0.6", "0.577"]


def test_epoch_watch_finds_the_epoch_of_best_pt():
    """Ultralytics saves best.pt when an epoch's fitness equals the best so far; the final validation of best.pt
    arrives through the same callback without a training epoch before it and is not an epoch."""
    seen = []
    watch = EpochWatch(lambda done, total, m: seen.append((done, total, m)))
    trainer = SimpleNamespace(epochs=4, best_fitness=None)
    for epoch, m in enumerate((0.2, 0.5, 0.4, 0.5)):
        trainer.epoch, trainer.fitness, trainer.metrics = epoch, m, {"metrics/mAP50-95(B)": m}
        trainer.best_fitness = max(trainer.best_fitness or 0, m)
        watch._train_epoch_end(trainer)
        watch._fit_epoch_end(trainer)
    trainer.epoch, trainer.metrics = 4, {"metrics/mAP50-95(B)": 0.3}  # final validation of best.pt
    watch._fit_epoch_end(trainer)
    assert (watch.best_epoch, watch.best_map) == (4, 0.5)  # a tie saves again: the later epoch
    assert seen == [(1, 4, 0.2), (2, 4, 0.5), (3, 4, 0.4), (4, 4, 0.5)]


# --- the ablation end to end ----------------------------------------------------------------------------------------


def _runs(out):
    return {p.parent.parent.name: p for p in sorted(out.glob("runs/*/seed0/done.json"))}


def test_ablate_artefacts_progress_resume_and_finetune(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ablate"
    kw = dict(data=TINY, out=out, epochs=1, imgsz=64, batch=8, workers=0, latency_runs=3)
    monkeypatch.setenv("CONVPLUG_CACHE", str(tmp_path / "cache"))
    rows = ablate(["baseline", "saconv"], **kw)
    assert [r["variant"] for r in rows] == ["yolov8n", "yolov8n-saconv"]
    for r in rows:
        for k in ("params", "gflops", "latency_cpu_ms", "train_s", "mAP50", "mAP50-95", "mAP50-95_train"):
            assert math.isfinite(r[k]), (k, r)
        assert r["params"] > 1e6 and r["gflops"] > 0 and r["latency_cpu_ms"] > 0 and r["train_s"] > 0
        assert 0 <= r["mAP50-95"] <= r["mAP50"] <= 1 and r["best_epoch"] == 1
    assert rows[0]["params"] != rows[1]["params"]  # the variant really is a different model
    with open(out / "results.csv") as f:
        assert [t["variant"] for t in csv.DictReader(f)] == ["yolov8n", "yolov8n-saconv"]
    md = (out / "results.md").read_text()
    assert "| yolov8n-saconv |" in md and "vs baseline" in md and "from scratch" in md and "One seed" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = capsys.readouterr().out
    train_log = out / "runs" / "yolov8n-saconv" / "seed0" / "train.log"
    assert f"[2/2] yolov8n-saconv seed 0: training, Ultralytics log {train_log}" in log
    assert "  epoch 1/1  mAP50-95 " in log and "ablation ~" in log and "[2/2] yolov8n-saconv seed 0: done in" in log
    assert "Epoch" in train_log.read_text() and "Epoch" not in log  # Ultralytics' own output went to the log

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
    assert "[1/2] yolov8n seed 0: reused" in log and "redoing from scratch" in log
    assert not stale.exists() and done["yolov8n-saconv"].exists()
    assert done["yolov8n"].stat().st_mtime_ns == stamps["yolov8n"]
    assert json.loads(done["yolov8n-saconv"].read_text())["row"]["variant"] == "yolov8n-saconv"

    # fine-tuning: every variant starts from the same weights, which the settings key tracks
    weights = out / "runs" / "yolov8n" / "seed0" / "weights" / "best.pt"
    ablate(["baseline", "saconv"], **{**kw, "out": tmp_path / "ft"}, pretrained=str(weights))
    md = (tmp_path / "ft" / "results.md").read_text()
    assert md.splitlines()[0].endswith("fine-tuned from best.pt") and str(weights) in md
    assert "- yolov8n: 355/355 tensors transferred" in md  # the same model: every tensor
    assert "- yolov8n-saconv: " in md and "SAConv2d <- Conv: exact" in md  # each plug-in layer's warm start
    for v in ("yolov8n", "yolov8n-saconv"):
        assert "Transferred" in (tmp_path / "ft" / "runs" / v / "seed0" / "train.log").read_text()
    # the start: the weights validated once before training, against the baseline's first epoch
    start = json.loads((tmp_path / "ft" / "start.json").read_text())["mAP50-95"]
    assert 0 <= start <= 1 and start == pytest.approx(rows[0]["mAP50-95"], abs=0.02)  # the same weights, validated
    with open(tmp_path / "ft" / "runs" / "yolov8n" / "seed0" / "results.csv") as f:
        first = float(next(csv.DictReader(f))["metrics/mAP50-95(B)"])
    assert f"Start: the weights validate at {start:.3f} mAP50-95 before any training; the baseline's first epoch " \
           f"gives {first:.3f} (seed 0)" in md
    assert f"start: the weights validate at {start:.3f} mAP50-95" in capsys.readouterr().out
    key = plan.settings_key(None, {"pretrained": str(weights)}, TINY)
    assert key["pretrained_sha256"] == plan.sha256(weights)


def test_ablate_refuses_bad_pretrained(tmp_path):
    with pytest.raises(ValueError, match="pretrained=True: give the weights"):
        ablate(["baseline"], data=TINY, out=tmp_path, pretrained=True)


def test_ablate_help_states_durations(capsys):
    with pytest.raises(SystemExit) as e:
        ablate_mod.main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    assert "2-core CPU" in text and "minutes" in text and "--pretrained" in text and "saconv" in text


# --- bench ----------------------------------------------------------------------------------------------------------


def test_gflops_count_deform_conv2d_as_the_convolution_it_computes():
    """DCNv2 = its main convolution (torchvision's deform_conv2d, which the flop counter did not know) with the
    bilinear sampling and modulation of each sampled value (5 MACs, as its thop rule), + the conv that predicts its
    2·k·k offsets and k·k masks."""
    import torch
    from ultralytics.nn.modules import Conv

    from yolo_convplug.modules.dcnv2 import DCNv2
    from yolo_convplug.research.measure import gflops

    x = torch.rand(2, 16, 20, 24)
    main, offsets = 2 * 2 * 32 * 16 * 9 * 10 * 12, 2 * 2 * 27 * 16 * 9 * 10 * 12  # stride 2: a 10 x 12 output
    sampling = 2 * 2 * 10 * 12 * 9 * 16 * 5
    assert gflops(Conv(16, 32, 3, 2), x) * 1e9 == pytest.approx(main)
    assert gflops(DCNv2(16, 32, 3, 2), x) * 1e9 == pytest.approx(main + sampling + offsets)


def test_bench_prints_measurements_only(tmp_path, capsys):
    path = tmp_path / "bench.csv"
    assert bench.main(["--only", "PConv", "--batch", "1", "--repeats", "1", "--warmup", "0", "--csv", str(path)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert "Targets" not in text and "MISS" not in text and "PASS" not in text
    assert max(map(len, lines)) <= 120
    rows = [line for line in lines if line.startswith("PConv")]
    assert len(rows) == len(bench.CONV_SHAPES)
    assert "n/a: PConv: s=2 is not valid" in rows[1]  # PConv keeps the resolution: no stride-2 case
    ratios = rows[0].split()[-6:]
    assert all(float(x) > 0 for x in ratios)
    with open(path) as f:
        table = list(csv.DictReader(f))
    assert [r["module"] for r in table] == ["PConv"] * 3 and float(table[0]["params_ratio"]) < 1


def test_bench_rejects_unknown_module(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--only", "NoSuchConv"])
    assert "NoSuchConv: not registered" in capsys.readouterr().err


def test_ablate_command_line_takes_settings_after_seeds(monkeypatch):
    """`--seeds 0 1 epochs=10`: the setting after the seeds reaches Ultralytics, the seeds stay integers."""
    calls = []
    monkeypatch.setattr(ablate_mod, "ablate", lambda variants, **kw: calls.append((variants, kw)))
    assert ablate_mod.main(["saconv", "--seeds", "0", "1", "epochs=10", "--out", "x"]) == 0
    (variants_, kw), = calls
    assert variants_ == ["saconv"] and kw["seeds"] == [0, 1] and kw["epochs"] == 10 and kw["out"] == "x"
