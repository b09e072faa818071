"""Running one job of an ablation: train with Ultralytics, its output sent to the run's ``train.log``, each epoch's
validation followed through callbacks, then profile ``best.pt`` and write ``done.json`` last."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

from .measure import deployed, gflops, latency_ms
from .plan import Job
from .progress import Progress

MAP_KEY = "metrics/mAP50-95(B)"  # Ultralytics' results.csv / trainer.metrics column


def _console():
    """A stream that reaches the console while fds 1 and 2 point at a log file: a duplicate of stdout's descriptor,
    or ``sys.stdout`` itself when it has none (captured output, notebooks)."""
    try:
        return open(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8", errors="replace")
    except (AttributeError, OSError, ValueError):
        return None


@contextlib.contextmanager
def redirect_output(log: Path | None):
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


class LoadWatch(logging.Handler):
    """Records, from Ultralytics' logger, what loading the pretrained weights did: ``transferred`` (``"N/M"`` of
    Ultralytics' "Transferred N/M items") and ``warm_start``, the warm start's per-layer summary lines
    (:mod:`yolo_convplug.warm_start`) followed by the calibration's (:mod:`yolo_convplug.calibrate`)."""

    PREFIX, CALIBRATION = "yolo-convplug warm start: ", "yolo-convplug calibration: "

    def __init__(self):
        super().__init__(logging.INFO)
        self.transferred, self.warm_start = None, []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("Transferred ") and self.transferred is None:
            self.transferred = text.split()[1]
        elif text.startswith(self.PREFIX):
            self.warm_start.append(text[len(self.PREFIX) :])
        elif text.startswith(self.CALIBRATION):
            self.warm_start.append("calibration: " + text[len(self.CALIBRATION) :])

    @contextlib.contextmanager
    def attached(self):
        from ultralytics.utils import LOGGER

        LOGGER.addHandler(self)
        try:
            yield self
        finally:
            LOGGER.removeHandler(self)


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


def validate_start(weights: str, data: str, train_args: dict, log: Path) -> float:
    """mAP50-95 of the pretrained ``weights`` on ``data`` before any training (Ultralytics' validator, the runs'
    imgsz, batch and device; its output into ``log``): the start that fine-tuning should keep."""
    from ultralytics import YOLO

    log.parent.mkdir(parents=True, exist_ok=True)
    with redirect_output(log):
        metrics = YOLO(weights).val(data=data, imgsz=train_args["imgsz"], batch=train_args["batch"], plots=False,
                                    device=train_args.get("device"), project=str(log.parent), name="start",
                                    exist_ok=True)  # fmt: skip
    return float(metrics.box.map)


def first_epoch_map(run_dir: Path) -> float:
    """The mAP50-95 of a run's first epoch (Ultralytics' results.csv in ``run_dir``), NaN when unknown."""
    import csv

    try:
        with open(run_dir / "results.csv") as f:
            return float(next(csv.DictReader(f))["metrics/mAP50-95(B)"])
    except (OSError, StopIteration, KeyError, ValueError):
        return float("nan")


def run_one(
    job: Job,
    data: str,
    train_args: dict,
    latency_runs: int = 50,
    latency_threads: int = 1,
    quiet: bool = True,
    progress: Progress | None = None,
) -> dict:
    """Train ``job.variant`` with ``job.seed`` into ``job.run_dir``, profile it, write ``done.json`` last; return
    its row."""
    from ultralytics import YOLO

    run_dir, variant = job.run_dir, job.variant
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    args = {**train_args, "seed": job.seed, "data": data, "project": str(run_dir.parent), "name": run_dir.name}
    progress = progress or Progress(1, silent=True)
    outer = progress.stream
    with redirect_output(run_dir / "train.log" if quiet else None) as console:
        progress.stream = console
        progress.start_run()
        watch = EpochWatch(progress.epoch)
        t = time.perf_counter()
        try:
            model = YOLO(variant.model)
            watch.attach(model)
            with LoadWatch().attached() as loaded:
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
            "seed": job.seed,
            **profile_checkpoint(weights, args["imgsz"], latency_runs, latency_threads),
            "train_s": train_s,
            "mAP50": float(metrics.box.map50),
            "mAP50-95": float(metrics.box.map),
            "best_epoch": watch.best_epoch,
            "mAP50-95_train": watch.best_map,
        }
        if train_args.get("pretrained"):
            row.update(transferred=loaded.transferred or "", warm_start=loaded.warm_start)
    info = {"row": row, "settings": job.settings, "latency_threads": latency_threads}
    (run_dir / "done.json").write_text(json.dumps(info, indent=2, allow_nan=True))
    return row
