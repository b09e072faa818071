"""Executing the jobs of an ablation. An executor takes the jobs still to train and yields, as each ends, the job
with its row or the exception it failed with; the ablation reports both the same way whichever executor ran them.
:class:`InProcess` trains them one after another in this process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Optional

from .plan import Job
from .progress import Progress
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
