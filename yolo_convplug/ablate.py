"""Ablation: train a baseline and module variants with identical settings and seeds, then tabulate and plot.

Per run (variant x seed) it records parameters, GFLOPs, CPU latency (fused model, batch 1, median after warm-up),
GPU latency where CUDA is available, training wall time, mAP50 and mAP50-95 (Ultralytics' final validation of
``best.pt``). Runs live in ``<out>/runs/<variant>/seed<k>/``; a ``done.json`` written last marks a finished run, which
a later call reuses when its settings are unchanged; a folder without it (an interrupted run) is redone from scratch.
``results.csv`` holds one row per run; ``results.md`` and ``results.png`` show mean ± std over seeds per variant, the
first variant being the baseline.

GFLOPs are counted with ``torch.utils.flop_counter`` on the fused model: every aten convolution and matmul, so a
module that calls ``F.conv2d`` with kernels built on the fly counts whatever its implementation (for our modules this
equals Ultralytics' ``get_flops`` with yolo-convplug's thop patch).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import resolve_data

REPO_YAMLS = Path(__file__).resolve().parents[1] / "model_yamls"
PLUGINS = ("saconv", "dsconv", "scconv", "condconv", "c2f-faster")
BASELINE = "yolov8{scale}.yaml"
# Settings shared by every run of an ablation; any of them can be overridden with key=value. They are tuned for short
# from-scratch runs on the shapes benchmark: AdamW at lr0=0.003 decaying to lrf=0.2 of it, one warm-up epoch, and,
# unless given, nbs (Ultralytics' nominal batch size, default 64) set to batch so that every batch is an optimizer
# step (with Ultralytics' defaults a 10-epoch run makes 40 optimizer steps and stops near mAP50 0.06). 20 epochs:
# at 10 a from-scratch YOLOv8n is still taking off and two seeds differ by 25 % in mAP50-95 (0.42 vs 0.31); at 20
# they differ by 7 % (0.67 vs 0.71).
TRAIN_DEFAULTS = dict(
    epochs=20,
    imgsz=160,
    batch=16,
    optimizer="AdamW",
    lr0=0.003,
    lrf=0.2,
    warmup_epochs=1,
    deterministic=True,
    pretrained=False,
    plots=False,
    val=True,
    verbose=False,
)
METRICS = ("params", "gflops", "latency_cpu_ms", "latency_gpu_ms", "train_s", "mAP50", "mAP50-95")


@dataclass(frozen=True)
class Variant:
    """A model to train: ``name`` labels it in tables, ``model`` is what ``YOLO(model)`` receives."""

    name: str
    model: str


def default_variants(scale: str = "n") -> list[str]:
    """The baseline ``yolov8<scale>.yaml`` and our five ``model_yamls/yolov8<scale>-*.yaml``."""
    return [BASELINE.format(scale=scale), *PLUGINS]


def resolve_variant(spec: str, scale: str = "n") -> Variant:
    """``saconv`` -> ``model_yamls/yolov8<scale>-saconv.yaml``; ``baseline`` -> ``yolov8<scale>.yaml``; files are made
    absolute (keeping the scale letter Ultralytics reads from the name); other names go to Ultralytics unchanged."""
    if spec == "baseline":
        spec = BASELINE.format(scale=scale)
    if spec in PLUGINS:
        if not REPO_YAMLS.is_dir():
            raise FileNotFoundError(
                f"variant {spec!r} names one of our model YAMLs, but {REPO_YAMLS} does not exist (installed from a "
                "wheel?); pass the YAML path instead, e.g. path/to/model_yamls/yolov8n-saconv.yaml"
            )
        path = REPO_YAMLS / f"yolov8{scale}-{spec}.yaml"
        return Variant(path.stem, str(path))
    p = Path(spec).expanduser()
    if p.suffix in (".yaml", ".yml") and (p.is_file() or p.parent != Path(".")):
        # a file, or a scaled name such as model_yamls/yolov8n-x.yaml whose unscaled file exists next to it
        return Variant(p.stem, str(p.resolve()))
    return Variant(Path(spec).stem, spec)


def _settings_key(variant: Variant | None, train_args: dict, data: str) -> dict:
    """What must match for a finished run to be reused: data, train arguments and the model's YAML content."""
    out = {"data": data, **{k: v for k, v in sorted(train_args.items()) if k not in ("verbose", "workers")}}
    if variant is not None:
        from ultralytics.nn.tasks import yaml_model_load

        cfg = json.dumps(yaml_model_load(variant.model), sort_keys=True, default=str)
        out["model"] = f"{variant.model} sha256:{hashlib.sha256(cfg.encode()).hexdigest()[:16]}"
    return out


@contextlib.contextmanager
def _redirect_output(log: Path | None):
    """Send Ultralytics' logs and progress bars to ``log`` (fds 1 and 2, ``sys.stdout``/``sys.stderr`` and the
    stream of Ultralytics' logger, which binds ``sys.stdout`` at import); no-op when None."""
    if log is None:
        yield
        return
    from ultralytics.utils import LOGGER

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    handlers = [h for h in LOGGER.handlers if type(h) is logging.StreamHandler]
    with open(log, "a", buffering=1) as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        streams = [h.setStream(f) for h in handlers]
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield
        finally:
            for h, stream in zip(handlers, streams):
                h.setStream(stream)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def count_gflops(model: torch.nn.Module, imgsz: int) -> float:
    """GFLOPs (2 x multiply-accumulates) of one forward pass at batch 1, counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    x = torch.zeros(1, 3, imgsz, imgsz, device=p.device, dtype=p.dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def measure_latency(
    model: torch.nn.Module, imgsz: int, device: str = "cpu", runs: int = 50, warmup: int = 10, threads: int = 1
) -> float:
    """Median milliseconds of one batch-1 forward pass of ``model`` (eval, fp32) on ``device`` after ``warmup``.

    CPU timings use ``threads`` torch threads (restored afterwards): one thread by default, which is what Ultralytics
    itself sets on a 2-core machine and what stays comparable on a shared one.
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    model = model.to(device).eval()
    x = torch.rand(1, 3, imgsz, imgsz, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + runs):
                sync()
                t = time.perf_counter()
                model(x)
                sync()
                if i >= warmup:
                    times.append((time.perf_counter() - t) * 1e3)
    finally:
        torch.set_num_threads(saved)
    return statistics.median(times)


def profile_checkpoint(weights: str | Path, imgsz: int, runs: int = 50, threads: int = 1) -> dict:
    """Params (unfused), GFLOPs and latency (fused) of a trained checkpoint."""
    from ultralytics import YOLO

    model = YOLO(str(weights)).model.float().eval()
    params = sum(p.numel() for p in model.parameters())
    model = model.fuse(verbose=False)
    out = {"params": params, "gflops": count_gflops(model, imgsz)}
    out["latency_cpu_ms"] = measure_latency(model, imgsz, "cpu", runs, threads=threads)
    out["latency_gpu_ms"] = measure_latency(model, imgsz, "cuda", runs) if torch.cuda.is_available() else math.nan
    model.cpu()
    return out


def run_one(
    variant: Variant,
    seed: int,
    run_dir: Path,
    data: str,
    train_args: dict,
    latency_runs: int = 50,
    latency_threads: int = 1,
    quiet: bool = True,
) -> dict:
    """Train ``variant`` with ``seed`` into ``run_dir`` (from scratch), profile it, write ``done.json`` last."""
    from ultralytics import YOLO

    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    args = {**train_args, "seed": seed, "data": data, "project": str(run_dir.parent), "name": run_dir.name}
    with _redirect_output(run_dir / "train.log" if quiet else None):
        t = time.perf_counter()
        try:
            metrics = YOLO(variant.model).train(exist_ok=True, **args)
        except Exception:
            traceback.print_exc()  # into train.log when quiet
            raise
        train_s = time.perf_counter() - t
        weights = run_dir / "weights" / "best.pt"
        weights = weights if weights.exists() else weights.with_name("last.pt")
        row = {
            "variant": variant.name,
            "model": variant.model,
            "seed": seed,
            **profile_checkpoint(weights, args["imgsz"], latency_runs, latency_threads),
            "train_s": train_s,
            "mAP50": float(metrics.box.map50),
            "mAP50-95": float(metrics.box.map),
        }
    info = {"row": row, "settings": _settings_key(variant, train_args, data), "latency_threads": latency_threads}
    (run_dir / "done.json").write_text(json.dumps(info, indent=2, allow_nan=True))
    return row


def log(*args, end="\n") -> None:
    """A progress line on the console, flushed at once (Ultralytics' own output may be redirected meanwhile)."""
    print(*args, end=end, flush=True)


def _load_done(run_dir: Path, settings: dict) -> dict | None:
    """The row of a finished run with the same settings, else None."""
    try:
        info = json.loads((run_dir / "done.json").read_text())
    except (OSError, ValueError):
        return None
    return info["row"] if info.get("settings") == json.loads(json.dumps(settings)) else None


def ablate(
    variants: list[str] | None = None,
    data: str | None = "shapes",
    out: str | Path = "runs/ablate",
    seeds: list[int] = (0,),
    scale: str = "n",
    latency_runs: int = 50,
    latency_threads: int = 1,
    quiet: bool = True,
    **train_overrides,
) -> list[dict]:
    """Train every variant with every seed under identical settings; write results.csv/.md/.png; return the rows.

    Args:
        variants: model specs (see ``resolve_variant``); default ``default_variants(scale)``. The first is the baseline.
        data: dataset (see ``resolve_data``): ``shapes`` (default), a data YAML, or None for COCO128 resolution.
        out: output folder; runs go to ``<out>/runs/<variant>/seed<k>``.
        seeds: training seeds; several give mean ± std.
        scale: scale letter used for the default and short variant names.
        latency_runs: timed forward passes per latency figure (after 10 warm-up passes).
        latency_threads: torch threads for the CPU latency (1: stable on shared machines, and what Ultralytics uses
            for CPU training on 2 cores).
        quiet: send Ultralytics' output to each run's ``train.log`` instead of the console (progress lines stay).
        **train_overrides: Ultralytics train arguments replacing ``TRAIN_DEFAULTS`` (epochs, imgsz, batch, device, ...).
    """
    out = Path(out).resolve()
    vs = [resolve_variant(v, scale) for v in (variants or default_variants(scale))]
    names = [v.name for v in vs]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    data = resolve_data(data)
    train_args = {**TRAIN_DEFAULTS, **train_overrides}
    train_args.setdefault("nbs", train_args["batch"])  # one optimizer step per batch (see TRAIN_DEFAULTS)
    jobs = [(v, s) for v in vs for s in seeds]
    rows, failed = [], []
    log(f"ablation: {len(vs)} variant(s) x {len(seeds)} seed(s) on {data} -> {out}")
    for j, (v, seed) in enumerate(jobs, 1):
        run_dir = out / "runs" / v.name / f"seed{seed}"
        head = f"[{j}/{len(jobs)}] {v.name} seed {seed}"
        row = _load_done(run_dir, _settings_key(v, train_args, data))
        if row is not None:
            log(f"{head} ... reused (done.json), mAP50-95 {row['mAP50-95']:.3f}")
            rows.append(row)
            continue
        if run_dir.exists():
            log(f"{head} ... unfinished or stale run folder found, redoing from scratch")
        log(f"{head} ... training", end="")
        t = time.perf_counter()
        try:
            row = run_one(v, seed, run_dir, data, train_args, latency_runs, latency_threads, quiet)
        except Exception as e:
            log(
                f" FAILED after {time.perf_counter() - t:.0f} s: {type(e).__name__}: {e} (log: {run_dir / 'train.log'})"
            )
            failed.append((v.name, seed, e))
            continue
        log(f" done {time.perf_counter() - t:.0f} s, mAP50 {row['mAP50']:.3f}, mAP50-95 {row['mAP50-95']:.3f}")
        rows.append(row)
    if rows:
        write_results(rows, out, _settings_key(None, train_args, data), latency_threads)
        log(f"results: {out / 'results.csv'}, {out / 'results.md'}, {out / 'results.png'}")
    if failed:
        raise RuntimeError(
            f"{len(failed)} run(s) failed: "
            + "; ".join(f"{n} seed {s}: {type(e).__name__}: {e}" for n, s, e in failed)
            + ". Rerun the same command to retry them; finished runs are reused."
        )
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per variant (in first-seen order): n runs and (mean, std) of each metric over seeds (std 0 for one run)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["variant"], []).append(r)
    out = []
    for name, rs in groups.items():
        s = {"variant": name, "n": len(rs)}
        for k in METRICS:
            vals = [float(r[k]) for r in rs]
            if any(math.isnan(v) for v in vals):  # e.g. no GPU latency
                s[k] = (math.nan, math.nan)
            else:
                s[k] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        out.append(s)
    return out


def _fmt(mean_std: tuple[float, float], digits: int, n: int) -> str:
    mean, std = mean_std
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def write_results(
    rows: list[dict], out: Path, settings: dict | None = None, latency_threads: int = 1
) -> tuple[Path, Path, Path]:
    """Write ``results.csv`` (one row per run), ``results.md`` (mean ± std per variant) and ``results.png``."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = out / "results.csv", out / "results.md", out / "results.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["variant", "model", "seed", *METRICS])
        w.writeheader()
        w.writerows({k: r[k] for k in w.fieldnames} for r in rows)

    summary = summarize(rows)
    base = summary[0]["mAP50-95"][0]
    lines = [
        "| variant | runs | params (M) | GFLOPs | CPU latency (ms) | GPU latency (ms) | train time (s) | mAP50 "
        "| mAP50-95 | mAP50-95 vs baseline |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        n = s["n"]
        ratio = f"{s['mAP50-95'][0] / base:.2f}x" if base > 0 else "-"
        lines.append(
            f"| {s['variant']} | {n} | {s['params'][0] / 1e6:.3f} | {s['gflops'][0]:.3f} | "
            f"{_fmt(s['latency_cpu_ms'], 2, n)} | {_fmt(s['latency_gpu_ms'], 2, n)} | {_fmt(s['train_s'], 0, n)} | "
            f"{_fmt(s['mAP50'], 3, n)} | {_fmt(s['mAP50-95'], 3, n)} | {ratio} |"
        )
    notes = [
        "",
        f"Baseline: {summary[0]['variant']}. Values are mean ± std over seeds where a variant has several runs.",
        "Latency: fused model, batch 1, fp32, median of timed passes after warm-up; "
        f"CPU with {latency_threads} torch thread(s) on {platform.processor() or platform.machine()} "
        f"({os.cpu_count()} cores); "
        "GPU where CUDA is available. GFLOPs: torch.utils.flop_counter on the fused model, batch 1, training imgsz.",
    ]
    if settings:
        notes.append("Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    md_path.write_text("\n".join(lines + notes) + "\n")
    plot_results(summary, png_path)
    return csv_path, md_path, png_path


def plot_results(summary: list[dict], path: Path) -> Path:
    """Two panels, mAP50-95 vs CPU latency and vs GFLOPs, one labelled point (with std bars) per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    for ax, key, label in zip(axes, ("latency_cpu_ms", "gflops"), ("CPU latency, batch 1 (ms)", "GFLOPs")):
        for i, s in enumerate(summary):
            (x, xe), (y, ye) = s[key], s["mAP50-95"]
            ax.errorbar(x, y, xerr=xe or None, yerr=ye or None, fmt="o", color=f"C{i}", capsize=3)
            dy = 5 if i % 2 == 0 else -12  # alternate above/below so that neighbours' labels do not overlap
            ax.annotate(s["variant"], (x, y), textcoords="offset points", xytext=(5, dy), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("mAP50-95")
        ax.grid(alpha=0.3)
    axes[0].set_title("accuracy vs CPU latency")
    axes[1].set_title("accuracy vs compute")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
