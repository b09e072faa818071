"""Ablation: train a baseline and module variants under identical settings and seeds, then report.

Each run (variant x seed) trains with Ultralytics, from scratch or fine-tuned from the same ``pretrained=`` weights
(plug-in layers start from the stock layers they replace, see :mod:`yolo_convplug.warm_start`), and records params,
GFLOPs, CPU latency (fused model, batch 1), GPU latency where CUDA is available, training wall time, mAP50 and
mAP50-95 of Ultralytics' final validation of ``best.pt``, and the in-training mAP50-95 of ``best.pt``'s epoch (the
checkpoint check of :mod:`yolo_convplug.research.report`). Runs live in ``<out>/runs/<variant>/seed<k>/`` with
Ultralytics' output in ``train.log``; ``done.json``, written last, marks a finished run, which a later call reuses when
its settings are unchanged; a folder without it (an interrupted run) is redone from scratch. While a run trains, the
console shows each epoch's mAP50-95 and the time left for the run and for the whole ablation.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import sys
import textwrap
import time
import traceback
from pathlib import Path

import torch

from .data import resolve_data, same_images
from .measure import deployed, gflops, latency_ms
from .report import Protocol, checkpoint_gap, console_summary, summarize, write_results
from .variants import DEFAULT_FAMILY, Variant, default_variants, families, resolve_variant, slugs
from .workflow import parse_overrides

# Settings shared by every run of an ablation; any of them can be overridden with key=value. They suit short runs on
# the shapes set: AdamW at lr0=0.003 decaying to lrf=0.2 of it, one warm-up epoch, and, unless given, nbs
# (Ultralytics' nominal batch size, default 64) set to batch so that every batch is an optimizer step (with
# Ultralytics' defaults, 256 images at batch 16 make 4 optimizer steps an epoch).
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
DEFAULT_DATA = "shapes"
# Seed spread of the default protocol (data=shapes, TRAIN_DEFAULTS, the yolov8 variants): the std of mAP50-95 over
# seeds, pooled over the baseline and every default variant (the mean of their per-variant variances), measured with
#   scratch:  python scripts/ablate.py --seeds 0 1 --out runs/ablate-scratch   (7 variants x 2 seeds: 0.092)
# The fine-tuning spread depends on the weights, so it is not stated: pass --seeds 0 1 to measure it per ablation.
SEED_SPREAD_MAP5095 = {"scratch": 0.092, "finetune": None}
MAP_KEY = "metrics/mAP50-95(B)"  # Ultralytics' results.csv / trainer.metrics column


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _settings_key(variant: Variant | None, train_args: dict, data: str) -> dict:
    """What must match for a finished run to be reused: data, train arguments, the content of the pretrained weights
    and of the model's YAML."""
    out = {"data": data, **{k: v for k, v in sorted(train_args.items()) if k not in ("verbose", "workers")}}
    weights = train_args.get("pretrained")
    if isinstance(weights, str) and Path(weights).is_file():
        out["pretrained_sha256"] = _sha256(Path(weights))
    if variant is not None:
        from ultralytics.nn.tasks import yaml_model_load

        cfg = json.dumps(yaml_model_load(variant.model), sort_keys=True, default=str)
        out["model"] = f"{variant.model} sha256:{hashlib.sha256(cfg.encode()).hexdigest()[:16]}"
    return out


def _console():
    """A stream that reaches the console while fds 1 and 2 point at a log file: a duplicate of stdout's descriptor,
    or ``sys.stdout`` itself when it has none (captured output, notebooks)."""
    try:
        return open(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8", errors="replace")
    except (AttributeError, OSError, ValueError):
        return None


@contextlib.contextmanager
def _redirect_output(log: Path | None):
    """Send Ultralytics' logs and progress bars to ``log`` (fds 1 and 2, ``sys.stdout``/``sys.stderr`` and the
    stream of Ultralytics' logger, which binds ``sys.stdout`` at import); yield a stream that still reaches the
    console. With ``log`` None nothing is redirected."""
    if log is None:
        yield sys.stdout
        return
    from ultralytics.utils import LOGGER

    sys.stdout.flush()
    sys.stderr.flush()
    console = _console()
    saved = os.dup(1), os.dup(2)
    handlers = [h for h in LOGGER.handlers if type(h) is logging.StreamHandler]
    with open(log, "a", buffering=1) as f:
        python_stdout = sys.stdout
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        streams = [h.setStream(f) for h in handlers]
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield console or python_stdout
        finally:
            for h, stream in zip(handlers, streams):
                h.setStream(stream)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if console is not None:
                console.close()


def _clock(seconds: float) -> str:
    """``75`` -> ``1:15``, ``3725`` -> ``1:02:05``."""
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class Progress:
    """The console side of an ablation: one line per epoch with its mAP50-95 and the time left for the run and for
    all runs still to train (rewritten in place on a terminal), estimated from the epochs and runs done so far."""

    def __init__(self, runs_to_train: int, silent: bool = False):
        self.left, self.silent = runs_to_train, silent
        self.durations: list[float] = []
        self.stream = sys.stdout
        self.t0 = time.perf_counter()
        self.width = 0

    def log(self, text: str) -> None:
        self.stream.write(("\n" if self.width else "") + text + "\n")
        self.stream.flush()
        self.width = 0

    def start_run(self) -> None:
        self.t0 = time.perf_counter()

    def epoch(self, done: int, total: int, map5095: float) -> None:
        if self.silent:
            return
        per_epoch = (time.perf_counter() - self.t0) / done
        run_left = per_epoch * (total - done)
        per_run = statistics.fmean(self.durations) if self.durations else per_epoch * total
        line = (
            f"  epoch {done}/{total}  mAP50-95 {map5095:.3f}  run {_clock(run_left)} left  "
            f"ablation ~{_clock(run_left + per_run * (self.left - 1))} left"
        )
        if self.stream.isatty():
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def end_run(self, seconds: float) -> None:
        self.durations.append(seconds)
        self.left -= 1


class AblationFailed(RuntimeError):
    """Some runs of an ablation failed (the others finished and are reported)."""


class EpochWatch:
    """Ultralytics callbacks that follow the in-training validation: each epoch's mAP50-95, and ``best_epoch`` and
    ``best_map`` of the epoch whose weights ``best.pt`` holds (Ultralytics saves it when the epoch's fitness equals
    the best so far). ``on_epoch(done, total, mAP50-95)`` is called after each epoch's validation."""

    def __init__(self, on_epoch):
        self.on_epoch = on_epoch
        self.best_epoch, self.best_map = 0, math.nan
        self._trained = False

    def attach(self, model) -> None:
        model.add_callback("on_train_epoch_end", self._train_epoch_end)
        model.add_callback("on_fit_epoch_end", self._fit_epoch_end)

    def _train_epoch_end(self, trainer) -> None:
        self._trained = True

    def _fit_epoch_end(self, trainer) -> None:
        if not self._trained:  # the final validation of best.pt, which Ultralytics also reports here
            return
        self._trained = False
        m = float(trainer.metrics.get(MAP_KEY, math.nan))
        if trainer.fitness is not None and trainer.fitness == trainer.best_fitness:
            self.best_epoch, self.best_map = trainer.epoch + 1, m
        self.on_epoch(trainer.epoch + 1, trainer.epochs, m)


def profile_checkpoint(weights: str | Path, imgsz: int, runs: int = 50, threads: int = 1) -> dict:
    """Params (unfused), GFLOPs and latencies (fused) of a trained checkpoint."""
    from ultralytics import YOLO

    model = YOLO(str(weights)).model.float().eval()
    params = sum(p.numel() for p in model.parameters())
    model = deployed(model)
    x = torch.rand(1, 3, imgsz, imgsz)
    out = {"params": params, "gflops": gflops(model, x), "latency_cpu_ms": latency_ms(model, x, runs, threads=threads)}
    out["latency_gpu_ms"] = latency_ms(model.cuda(), x.cuda(), runs) if torch.cuda.is_available() else math.nan
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
    progress: Progress | None = None,
) -> dict:
    """Train ``variant`` with ``seed`` into ``run_dir``, profile it, write ``done.json`` last; return its row."""
    from ultralytics import YOLO

    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    args = {**train_args, "seed": seed, "data": data, "project": str(run_dir.parent), "name": run_dir.name}
    progress = progress or Progress(1, silent=True)
    outer = progress.stream
    with _redirect_output(run_dir / "train.log" if quiet else None) as console:
        progress.stream = console
        progress.start_run()
        watch = EpochWatch(progress.epoch)
        t = time.perf_counter()
        try:
            model = YOLO(variant.model)
            watch.attach(model)
            metrics = model.train(exist_ok=True, **args)
        except Exception:
            traceback.print_exc()  # into train.log when quiet
            raise
        finally:
            progress.stream = outer
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
            "best_epoch": watch.best_epoch,
            "mAP50-95_train": watch.best_map,
        }
    info = {"row": row, "settings": _settings_key(variant, train_args, data), "latency_threads": latency_threads}
    (run_dir / "done.json").write_text(json.dumps(info, indent=2, allow_nan=True))
    return row


def _load_done(run_dir: Path, settings: dict) -> dict | None:
    """The row of a finished run with the same settings, else None."""
    try:
        info = json.loads((run_dir / "done.json").read_text())
    except (OSError, ValueError):
        return None
    return info["row"] if info.get("settings") == json.loads(json.dumps(settings)) else None


def _pretrained(value) -> str | None:
    """The ``pretrained=`` train argument as weights to fine-tune from: a file (made absolute), an Ultralytics weights
    name it downloads, or None for training from scratch."""
    if value in (None, False, "", "False"):
        return None
    if value is True or not str(value).endswith(".pt"):
        raise ValueError(
            f"pretrained={value!r}: give the weights to fine-tune every variant from (a .pt file such as "
            "yolov8n.pt or runs/.../best.pt), or leave it out to train from scratch"
        )
    p = Path(str(value)).expanduser()
    return str(p.resolve()) if p.is_file() else str(value)


def _is_default_protocol(data_spec, train_args: dict) -> bool:
    """Whether the runs follow the protocol whose seed spread was measured: shapes and TRAIN_DEFAULTS (with any
    weights, device and number of data workers)."""
    defaults = {**TRAIN_DEFAULTS, "nbs": TRAIN_DEFAULTS["batch"]}
    ignore = ("pretrained", "device", "workers")
    return str(data_spec) == DEFAULT_DATA and {k: v for k, v in train_args.items() if k not in ignore} == {
        k: v for k, v in defaults.items() if k not in ignore
    }


def ablate(
    variants: list[str] | None = None,
    data: str | None = DEFAULT_DATA,
    out: str | Path = "runs/ablate",
    seeds: list[int] = (0,),
    scale: str = "n",
    family: str = DEFAULT_FAMILY,
    latency_runs: int = 50,
    latency_threads: int = 1,
    quiet: bool = True,
    **train_overrides,
) -> list[dict]:
    """Train every variant with every seed under identical settings; write results.csv/.md/.png; return the rows.

    Args:
        variants: variant specs (see :func:`~yolo_convplug.research.variants.resolve_variant`); default: the
            baseline and every shipped YAML of ``family``. The first is the baseline.
        data: dataset (see :func:`~yolo_convplug.research.data.resolve_data`): ``shapes`` (default), a data YAML,
            or None for COCO128 resolution.
        out: output folder; runs go to ``<out>/runs/<variant>/seed<k>``.
        seeds: training seeds; several give mean ± std and the beyond-spread marks.
        scale: scale letter of the baseline and short variant names.
        family: model family of the baseline and short variant names (``yolov8``, ``yolo11``, ...).
        latency_runs: timed forward passes per latency figure (after 10 warm-up passes).
        latency_threads: torch threads for the CPU latency (1: stable on shared machines).
        quiet: send Ultralytics' output to each run's ``train.log`` instead of the console (progress stays).
        **train_overrides: Ultralytics train arguments replacing ``TRAIN_DEFAULTS`` (epochs, imgsz, batch, device,
            ``pretrained=WEIGHTS`` to fine-tune every variant and the baseline from the same weights, ...).
    """
    out = Path(out).resolve()
    vs = [resolve_variant(v, family, scale) for v in (variants or default_variants(family))]
    names = [v.name for v in vs]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    data_spec, data = data, resolve_data(data)
    train_args = {**TRAIN_DEFAULTS, **train_overrides}
    train_args["pretrained"] = _pretrained(train_args.get("pretrained")) or False
    train_args.setdefault("nbs", train_args["batch"])  # one optimizer step per batch (see TRAIN_DEFAULTS)
    pretrained = train_args["pretrained"] or None
    kind = "finetune" if pretrained else "scratch"
    label = str(data_spec) if str(data_spec).startswith("shapes") else Path(data).name
    protocol = Protocol(
        data=label,
        epochs=train_args["epochs"],
        imgsz=train_args["imgsz"],
        seeds=tuple(seeds),
        pretrained=pretrained,
        same_images=same_images(data),
        seed_spread=SEED_SPREAD_MAP5095[kind] if _is_default_protocol(data_spec, train_args) else None,
    )
    jobs = [(v, s) for v in vs for s in seeds]
    settings = {(v.name, s): _settings_key(v, train_args, data) for v, s in jobs}
    todo = sum(_load_done(out / "runs" / v.name / f"seed{s}", settings[v.name, s]) is None for v, s in jobs)
    progress = Progress(todo)
    progress.log(f"ablation: {len(vs)} variant(s) x {len(seeds)} seed(s): {protocol.title()}")
    progress.log(f"data: {data}; output: {out}")
    if protocol.same_images:
        progress.log(f"note: {label} validates on its training images: this measures fitting, not generalisation")
    rows, failed = [], []
    for j, (v, seed) in enumerate(jobs, 1):
        run_dir = out / "runs" / v.name / f"seed{seed}"
        head = f"[{j}/{len(jobs)}] {v.name} seed {seed}"
        row = _load_done(run_dir, settings[v.name, seed])
        if row is not None:
            progress.log(f"{head}: reused (done.json), mAP50-95 {row['mAP50-95']:.3f}")
            rows.append(row)
            continue
        if run_dir.exists():
            progress.log(f"{head}: unfinished or stale run folder found, redoing from scratch")
        progress.log(f"{head}: training" + (f", Ultralytics log {run_dir / 'train.log'}" if quiet else ""))
        t = time.perf_counter()
        try:
            row = run_one(v, seed, run_dir, data, train_args, latency_runs, latency_threads, quiet, progress)
        except Exception as e:
            progress.log(f"{head}: FAILED after {time.perf_counter() - t:.0f} s: {type(e).__name__}: {e}")
            failed.append((v.name, seed, e))
            continue
        finally:
            progress.end_run(time.perf_counter() - t)
        progress.log(
            f"{head}: done in {time.perf_counter() - t:.0f} s, mAP50 {row['mAP50']:.3f}, mAP50-95 {row['mAP50-95']:.3f}"
        )
        gap, flagged = checkpoint_gap(row["mAP50-95"], row["mAP50-95_train"])
        if flagged:
            progress.log(
                f"  MISMATCH: best.pt validates at mAP50-95 {row['mAP50-95']:.3f}, but its epoch "
                f"({row['best_epoch']}) validated at {row['mAP50-95_train']:.3f} during training ({gap:+.1%}): "
                "the saved checkpoint does not reproduce the trained model"
            )
        rows.append(row)
    if rows:
        paths = write_results(rows, out, protocol, _settings_key(None, train_args, data), latency_threads)
        summary = console_summary(summarize(rows), protocol)
        progress.log("\n" + "\n".join(textwrap.fill(line, 118) if line else line for line in summary.splitlines()))
        progress.log("results: " + ", ".join(map(str, paths)))
    if failed:
        raise AblationFailed(
            f"{len(failed)} run(s) failed: "
            + "; ".join(f"{n} seed {s}: {type(e).__name__}: {e}" for n, s, e in failed)
            + ". Rerun the same command to retry them; finished runs are reused."
        )
    return rows


HELP = """\
Train the baseline and module variants with identical settings and seeds; write a table and a plot.

Variants (positional; the first is the baseline): 'baseline' (-> <family><scale>.yaml), the slug of a shipped
model YAML, any model YAML path, or an Ultralytics built-in such as yolo11n.yaml. Default: the baseline and every
shipped YAML of the family. Shipped slugs per --family:
{slugs}

Protocol: from scratch by default; --pretrained WEIGHTS (or pretrained=WEIGHTS) fine-tunes the baseline and every
variant from the same weights, each plug-in layer starting from the stock layer it replaces.

Outputs in --out: results.csv (one row per run), results.md (per variant: mean ± std over seeds, which variants
differ from the baseline by more than their seed spread, and whether each best.pt reproduces its in-training
validation), results.png (mAP50-95 against CPU latency and GFLOPs), and runs/<variant>/seed<k>/ with Ultralytics'
files and train.log. Rerunning the same command reuses finished runs (done.json) and redoes interrupted ones.

Time: on a 2-core CPU one run at the defaults (shapes: 256 train / 64 val images, imgsz 160, 20 epochs, batch 16)
takes about 3.5 to 4 minutes for yolov8n and most variants, up to 1.5x that for SAConv2d, so the {n} default
variants take about {low} to {high} minutes per seed; other load on the machine makes it slower, and the console
shows each epoch and the time left. On a GPU (device=0) an epoch takes seconds. The defaults suit short runs (AdamW
lr0=0.003, lrf=0.2, one warm-up epoch, nbs=batch); for long runs on real data pass e.g. data=coco128.yaml imgsz=640
epochs=100 optimizer=auto lrf=0.01 warmup_epochs=3 nbs=64, ideally on a GPU.

Examples:
  convplug ablate                                # all variants on shapes, from scratch
  convplug ablate baseline saconv --seeds 0 1 2  # mean ± std over three seeds
  convplug ablate --pretrained runs/detect/train/weights/best.pt --seeds 0 1
  convplug ablate data=coco128.yaml epochs=100 imgsz=640 device=0 --out runs/ablate-coco
"""


def main(argv: list[str] | None = None) -> int:
    """``convplug ablate`` / ``scripts/ablate.py``: parse the command line, run :func:`ablate`; 0 when every run
    finished, 1 when some failed, 2 for bad arguments."""
    n = len(default_variants())
    shipped = "\n".join(f"  {f}: {', '.join(slugs(f))}" for f in families())
    p = argparse.ArgumentParser(
        prog="convplug ablate",
        description=HELP.format(slugs=shipped, n=n, low=round(n * 3.5), high=round(n * 4.3)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "args",
        nargs="*",
        metavar="VARIANT | key=value",
        help="variants and Ultralytics train arguments; defaults: "
        + " ".join(f"{k}={v}" for k, v in TRAIN_DEFAULTS.items()),
    )
    p.add_argument(
        "--data", default=DEFAULT_DATA, help="'shapes' (default), a data YAML, or 'coco128' for COCO128 resolution"
    )
    p.add_argument(
        "--pretrained", metavar="WEIGHTS", help="fine-tune every variant and the baseline from these weights"
    )
    p.add_argument("--seeds", nargs="+", default=["0"], help="training seeds (several give mean ± std)")
    p.add_argument("--out", default="runs/ablate", help="output folder (default runs/ablate)")
    p.add_argument("--family", default=DEFAULT_FAMILY, choices=families(), help="model family (default yolov8)")
    p.add_argument("--scale", default="n", help="scale letter for the baseline and short variant names (default n)")
    p.add_argument("--latency-runs", type=int, default=50, help="timed forward passes per latency figure")
    p.add_argument("--latency-threads", type=int, default=1, help="torch threads for CPU latency (default 1)")
    p.add_argument("--verbose", action="store_true", help="show Ultralytics' output instead of writing train.log")
    a = p.parse_intermixed_args(argv)
    # `--seeds 0 1 epochs=10`: --seeds takes every word up to the next option; the words that are no seed go back
    seeds = [int(x) for x in a.seeds if x.lstrip("-").isdigit()]
    a.args += [x for x in a.seeds if not x.lstrip("-").isdigit()]
    try:
        kw = parse_overrides([x for x in a.args if "=" in x])
        data = kw.pop("data", a.data)
        seed = kw.pop("seed", None)
        if a.pretrained:
            kw["pretrained"] = a.pretrained
        ablate(
            [x for x in a.args if "=" not in x] or None,
            data=None if data == "coco128" else data,
            out=kw.pop("out", a.out),
            seeds=[seed] if isinstance(seed, int) else seeds,
            scale=a.scale,
            family=a.family,
            latency_runs=a.latency_runs,
            latency_threads=a.latency_threads,
            quiet=not a.verbose,
            **kw,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"ablate: error: {e}", file=sys.stderr)
        return 2
    except AblationFailed as e:
        print(f"ablate: {e}", file=sys.stderr)
        return 1
    return 0
