"""Executing the jobs of an ablation. An executor takes the jobs still to train and yields, as each ends, the job
with its row or the exception it failed with; the ablation reports both the same way whichever executor ran them.
:class:`InProcess` trains them one after another in this process; :class:`RayExecutor` makes each a Ray task, as many at
once as the cluster's CPUs and GPUs hold, and writes the run folders the workers send back under the driver's output.
Ray is imported only inside the functions that use it."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from .plan import Job
from .progress import Progress, clock
from .report import checkpoint_gap
from .run import run_one

Outcome = tuple[Job, Optional[dict], Optional[Exception]]  # (job, row, None) or (job, None, error)


class InProcess:
    """Train every job in this process, in order; Ultralytics' output goes to each run's ``train.log`` when quiet."""

    def __init__(self, data: str, train_args: dict, latency_runs: int = 50, latency_threads: int = 1,
                 quiet: bool = True):  # fmt: skip
        self.data, self.train_args, self.quiet = data, train_args, quiet
        self.latency_runs, self.latency_threads = latency_runs, latency_threads

    def run(self, jobs: list[tuple[str, Job]], progress: Progress) -> Iterator[Outcome]:
        """``jobs``: (console heading, job) pairs; yields (job, row, None) or (job, None, exception) per job."""
        for head, job in jobs:
            if job.run_dir.exists():
                progress.log(f"{head}: unfinished or stale run folder found, redoing from scratch")
            log = f", Ultralytics log {job.run_dir / 'train.log'}" if self.quiet else ""
            progress.log(f"{head}: training{log}")
            t = time.perf_counter()
            try:
                row = run_one(job, self.data, self.train_args, self.latency_runs, self.latency_threads, self.quiet,
                              progress)  # fmt: skip
            except Exception as e:
                progress.log(f"{head}: FAILED after {time.perf_counter() - t:.0f} s: {type(e).__name__}: {e}")
                yield job, None, e
                continue
            finally:
                progress.end_run(time.perf_counter() - t)
            progress.log(
                f"{head}: done in {time.perf_counter() - t:.0f} s, mAP50 {row['mAP50']:.3f}, "
                f"mAP50-95 {row['mAP50-95']:.3f}"
            )
            log_checkpoint_gap(row, progress)
            log_warm_start(row, progress)
            yield job, row, None


def log_checkpoint_gap(row: dict, progress: Progress) -> None:
    """Say when a run's best.pt does not reproduce its epoch's in-training validation."""
    gap, flagged = checkpoint_gap(row["mAP50-95"], row["mAP50-95_train"])
    if flagged:
        progress.log(
            f"  MISMATCH: best.pt validates at mAP50-95 {row['mAP50-95']:.3f}, but its epoch "
            f"({row['best_epoch']}) validated at {row['mAP50-95_train']:.3f} during training ({gap:+.1%}): "
            "the saved checkpoint does not reproduce the trained model"
        )


def log_warm_start(row: dict, progress: Progress) -> None:
    """Say how many tensors a fine-tuned run took from the weights and what each plug-in layer did."""
    if row.get("transferred"):
        progress.log(f"  warm start: {row['transferred']} tensors transferred")
        for line in row.get("warm_start") or []:
            progress.log(f"    {line}")


# --- Ray: every job a Ray task, its run folder sent back to the driver ------------------------------------------------

RAY_MISSING = '--ray needs Ray: pip install "yolo-convplug[ray]"'
RUN_FILES = ("done.json", "results.csv", "train.log", "args.yaml", "weights/best.pt")  # what a worker sends back


class RayUnavailable(RuntimeError):
    """Ray is not installed, or the cluster address does not answer: the one-line message says which."""


def connect_ray(address: str = "local", num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Start a local Ray (``address`` 'local': this machine's CPUs and GPUs, or ``num_cpus``/``num_gpus``) or join
    the cluster at ``address`` (``auto``, ``ray://head:10001``); return whether this call started the connection
    (False when Ray was already initialized). Raise :class:`RayUnavailable` when Ray is missing or the address does
    not answer."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable(RAY_MISSING) from None
    if ray.is_initialized():
        return False
    probe_address(address)
    try:
        if address == "local":
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except Exception as e:  # ConnectionError, TimeoutError, RuntimeError, ValueError depending on the address kind
        raise RayUnavailable(f"--ray {address}: cannot join a Ray cluster there: {type(e).__name__}: {e}") from None
    return True


def probe_address(address: str, timeout_s: float = 5) -> None:
    """Raise :class:`RayUnavailable` when a ``host:port`` address accepts no connection within ``timeout_s`` (Ray
    itself retries such an address for minutes); ``local``, ``auto`` and ``ray://`` addresses are left to Ray."""
    import socket

    host, _, port = address.rpartition(":")
    if address in ("local", "auto") or "://" in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RayUnavailable(f"--ray {address}: no Ray cluster answers there ({e})") from None


def ray_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the connected Ray cluster."""
    import ray

    total = ray.cluster_resources()
    return float(total.get("CPU", 1)), float(total.get("GPU", 0))


def default_resources(cpus: float, gpus: float) -> tuple[int, float]:
    """Per-run (CPUs, GPUs): one GPU a run where there are GPUs, and the CPUs shared by the runs that fit at once."""
    gpus_per_run = 1.0 if gpus >= 1 else 0.0
    return max(1, int(cpus // max(1, int(gpus)))), gpus_per_run


def worker_dir(job: Job) -> Path:
    """Where a worker trains ``job``: a folder of its own machine, named after the driver's run folder so that runs
    of different ablations never meet (``CONVPLUG_RAY_WORKDIR``, default the system's temporary folder)."""
    import hashlib

    root = Path(os.environ.get("CONVPLUG_RAY_WORKDIR") or Path(tempfile.gettempdir()) / "convplug-ray")
    tag = hashlib.sha256(str(job.run_dir).encode()).hexdigest()[:12]
    return root / tag / job.run_dir.parent.name / job.run_dir.name


class StatusBoard:
    """A Ray actor the tasks tell when they start (node, device, process id) and when an epoch ends; the driver
    reads it to print 'running', each epoch, and to notice a retried run (a second start of the same job)."""

    def __init__(self):
        self.starts: dict[int, list[dict]] = {}
        self.epochs: list[tuple[int, int, int, float]] = []

    def started(self, index: int, info: dict) -> None:
        self.starts.setdefault(index, []).append(info)

    def epoch(self, index: int, done: int, total: int, map5095: float) -> None:
        self.epochs.append((index, done, total, map5095))

    def read(self) -> tuple[dict[int, list[dict]], list[tuple[int, int, int, float]]]:
        """The starts so far, and the epochs reported since the last read."""
        epochs, self.epochs = self.epochs, []
        return self.starts, epochs


class BoardProgress(Progress):
    """A worker's progress: each epoch goes to the driver's :class:`StatusBoard`, nothing to the worker's console."""

    def __init__(self, board, index: int):
        super().__init__(1, silent=True)
        self.board, self.index, self.sent = board, index, []

    def epoch(self, done: int, total: int, map5095: float) -> None:
        self.sent.append(self.board.epoch.remote(self.index, done, total, map5095))

    def flush(self) -> None:
        """Wait until the board holds every epoch sent, so the driver sees them before the run's end."""
        import ray

        ray.get(self.sent)


def train_on_worker(index, job, data_spec, data, train_args, latency_runs, latency_threads, quiet, cpus, keep_weights,
                    board) -> tuple[Optional[dict], dict[str, bytes], str, Optional[Exception]]:  # fmt: skip
    """The Ray task: train ``job`` in this worker's own folder with torch threads set to its CPU share and
    Ultralytics' device following Ray's GPUs (CUDA_VISIBLE_DEVICES holds them; torch index 0 is the first), then
    return its row, the run folder's files (:data:`RUN_FILES`) as bytes, where ``best.pt`` stays when it is kept on
    the worker, and None; or, when the training raised, (None, its train.log, "", the exception)."""
    import dataclasses
    import socket

    import ray
    import torch

    from .data import resolve_data

    torch.set_num_threads(max(1, int(cpus)))
    gpus = ray.get_gpu_ids()
    device = 0 if gpus else "cpu"
    local = dataclasses.replace(job, run_dir=worker_dir(job))
    local.run_dir.parent.mkdir(parents=True, exist_ok=True)
    pid_file = local.run_dir.parent / f"{local.run_dir.name}.pid"  # lets an operator (or a test) find the trainer
    pid_file.write_text(str(os.getpid()))
    where = f"{socket.gethostname()} {'GPU ' + ','.join(map(str, gpus)) if gpus else 'CPU'}"
    progress = BoardProgress(board, index)
    # never ray.get before the training ends: a task blocked in ray.get lends its CPUs, and Ray would start another run
    progress.sent.append(board.started.remote(index, {"where": where, "pid": os.getpid()}))
    data = data if Path(data).exists() else resolve_data(data_spec)  # a worker without the driver's files makes them
    try:
        row = run_one(local, data, {**train_args, "device": device}, latency_runs, latency_threads, quiet, progress)
    except Exception as e:  # a real failure: reported once (no retry), with its train.log sent back
        log = local.run_dir / "train.log"
        files = {"train.log": log.read_bytes()} if log.is_file() else {}
        shutil.rmtree(local.run_dir, ignore_errors=True)
        pid_file.unlink(missing_ok=True)
        return None, files, "", e
    progress.flush()
    files, kept = collect_run(local.run_dir, keep_weights)
    pid_file.unlink(missing_ok=True)
    return row, files, kept, None


def collect_run(run_dir: Path, keep_weights: bool) -> tuple[dict[str, bytes], str]:
    """A finished run's files to send back (:data:`RUN_FILES`, without ``best.pt`` when kept on the worker) and
    ``host:path`` of the kept ``best.pt`` (else ""); the rest of the worker's folder is removed."""
    import socket

    files = {}
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_file() and not (keep_weights and name.endswith(".pt")):
            files[name] = path.read_bytes()
    if not keep_weights:
        shutil.rmtree(run_dir, ignore_errors=True)
        return files, ""
    for path in run_dir.rglob("*"):
        if path.is_file() and path.name != "best.pt":
            path.unlink()
    return files, f"{socket.gethostname()}:{run_dir / 'weights' / 'best.pt'}"


class RayExecutor:
    """Train every job as a Ray task (``cpus``/``gpus`` each), as many at once as the cluster holds; write each
    finished run's files under the driver's run folder, so no shared filesystem is needed. A worker process that dies
    makes Ray retry its run (``max_retries``); an exception in the training is reported once, as in-process."""

    MAX_RETRIES = 3
    POLL_S = 2.0

    def __init__(self, data_spec, data: str, train_args: dict, latency_runs: int = 50, latency_threads: int = 1,
                 quiet: bool = True, cpus: float = 1, gpus: float = 0, keep_weights: bool = False):  # fmt: skip
        self.data_spec, self.data, self.train_args, self.quiet = data_spec, data, train_args, quiet
        self.latency_runs, self.latency_threads = latency_runs, latency_threads
        self.cpus, self.gpus, self.keep_weights = cpus, gpus, keep_weights

    def run(self, jobs: list[tuple[str, Job]], progress: Progress) -> Iterator[Outcome]:
        """``jobs``: (console heading, job) pairs; yields (job, row, None) or (job, None, exception) as runs end."""
        import ray

        board = ray.remote(num_cpus=0)(StatusBoard).remote()
        task = ray.remote(train_on_worker).options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_retries=self.MAX_RETRIES, retry_exceptions=False
        )
        pending, t0 = {}, {}
        for index, (head, job) in enumerate(jobs):
            ref = task.remote(index, job, self.data_spec, self.data, self.train_args, self.latency_runs,
                              self.latency_threads, self.quiet, self.cpus, self.keep_weights, board)  # fmt: skip
            pending[ref] = index
            progress.log(f"{head}: queued ({self.cpus:g} CPU, {self.gpus:g} GPU)")
        seen: dict[int, int] = {}
        durations: list[float] = []
        shared: set[int] = set()  # runs that trained while another run trained on the same node
        at_once = 1  # the most runs seen training at the same time: what the cluster holds
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.POLL_S)
                starts, epochs = ray.get(board.read.remote())
                self._report_starts(starts, seen, t0, jobs, progress)
                running = [i for i in pending.values() if i in seen]
                shared |= self._sharing_a_node(starts, running)
                at_once = max(at_once, len(running))
                for index, done, total, map5095 in epochs:
                    progress.log(f"{jobs[index][0]}: epoch {done}/{total}  mAP50-95 {map5095:.3f}")
                for ref in ready:
                    index = pending.pop(ref)
                    head, job = jobs[index]
                    seconds = time.perf_counter() - t0.get(index, time.perf_counter())
                    try:
                        row, files, kept, error = ray.get(ref)
                    except Exception as e:  # the task itself failed: retries used up, or its result was lost
                        files, error = {}, getattr(e, "cause", None) or e
                    if error is None and index in shared:
                        row["latency_shared"] = True
                    self._write_back(job, files, kept if error is None else "", row if index in shared else None)
                    if error is not None:
                        progress.log(f"{head}: FAILED after {seconds:.0f} s: {type(error).__name__}: {error}")
                        yield job, None, error
                        continue
                    durations.append(seconds)
                    eta = self._time_left(durations, pending, seen, t0, at_once)
                    progress.log(
                        f"{head}: done in {seconds:.0f} s, mAP50 {row['mAP50']:.3f}, "
                        f"mAP50-95 {row['mAP50-95']:.3f}{eta}"
                    )
                    log_checkpoint_gap(row, progress)
                    log_warm_start(row, progress)
                    yield job, row, None
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    @staticmethod
    def _sharing_a_node(starts: dict, running: list[int]) -> set[int]:
        """The runs of ``running`` whose node (the host of their latest start) another running run shares."""
        hosts: dict[str, list[int]] = {}
        for index in running:
            hosts.setdefault(starts[index][-1]["where"].split()[0], []).append(index)
        return {i for group in hosts.values() if len(group) > 1 for i in group}

    @staticmethod
    def _time_left(durations: list[float], pending: dict, seen: dict, t0: dict, at_once: int) -> str:
        """The ablation's time left: the work still to do (a mean finished run for each queued run, the rest of one
        for each run in flight) over ``at_once``, the most runs seen training together (the run that replaces a
        finished one may not have started yet when this is computed)."""
        if not pending:
            return ""
        mean, now = statistics.fmean(durations), time.perf_counter()
        work = sum(max(0.0, mean - (now - t0[i])) if i in seen else mean for i in pending.values())
        return f", ablation ~{clock(work / at_once)} left"

    @staticmethod
    def _report_starts(starts: dict, seen: dict, t0: dict, jobs, progress: Progress) -> None:
        """Print 'running' for each new start, 'retried' when a job started again after its worker died."""
        for index, infos in sorted(starts.items()):
            for attempt in range(seen.get(index, 0), len(infos)):
                head = jobs[index][0]
                where = infos[attempt]["where"]
                if attempt:
                    progress.log(f"{head}: retried (attempt {attempt + 1}) on {where}: its worker process died")
                else:
                    progress.log(f"{head}: running on {where}")
                t0[index] = time.perf_counter()
            seen[index] = len(infos)

    def _write_back(self, job: Job, files: dict[str, bytes], kept: str, row: dict | None = None) -> None:
        """Write a worker's run files under the driver's run folder; note where a kept ``best.pt`` stays; ``row``
        (when given) replaces the row in ``done.json``, so a reused run keeps the driver's marks."""
        if job.run_dir.exists():
            shutil.rmtree(job.run_dir)
        for name, content in files.items():
            if name == "done.json":
                continue
            path = job.run_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        if kept:
            (job.run_dir / "weights").mkdir(parents=True, exist_ok=True)
            (job.run_dir / "weights" / "best.pt.on-worker").write_text(kept + "\n")
        if "done.json" in files:  # last, as a run in-process writes it; a failed run sends its train.log only
            done = files["done.json"]
            if row is not None:
                done = json.dumps({**json.loads(done), "row": row}, indent=2, allow_nan=True).encode()
            (job.run_dir / "done.json").write_bytes(done)
