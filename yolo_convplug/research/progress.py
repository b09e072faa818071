"""The console side of an ablation: one line per event, and per epoch its mAP50-95 with the time left."""

from __future__ import annotations

import statistics
import sys
import time


def clock(seconds: float) -> str:
    """``75`` -> ``1:15``, ``3725`` -> ``1:02:05``."""
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class Progress:
    """One line per epoch with its mAP50-95 and the time left for the run and for all runs still to train (rewritten
    in place on a terminal), estimated from the epochs and runs done so far."""

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
            f"  epoch {done}/{total}  mAP50-95 {map5095:.3f}  run {clock(run_left)} left  "
            f"ablation ~{clock(run_left + per_run * (self.left - 1))} left"
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
