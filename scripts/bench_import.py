"""Time ``from ultralytics import YOLO`` with the plug-in's start-up hook on and off (``YOLO_CONVPLUG_DISABLE=1``).

Each run is a fresh interpreter of this venv; the two modes alternate so machine load hits both alike. Prints every
run, the medians and their ratio (plug-in / stock)::

    python scripts/bench_import.py --runs 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

CODE = "import time; t = time.perf_counter(); from ultralytics import YOLO; print(time.perf_counter() - t)"


def time_import(disable: bool) -> float:
    """Seconds ``from ultralytics import YOLO`` takes in a fresh process (interpreter start-up excluded)."""
    env = {k: v for k, v in os.environ.items() if k != "YOLO_CONVPLUG_DISABLE"}
    if disable:
        env["YOLO_CONVPLUG_DISABLE"] = "1"
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="runs per mode (default 5)")
    ap.add_argument("--max-ratio", type=float, default=1.10, help="exit 1 above this plug-in/stock ratio (1.10)")
    args = ap.parse_args(argv)
    time_import(False), time_import(True)  # warm the file cache for both modes
    times = {"plug-in": [], "stock": []}
    for run in range(args.runs):
        for mode in ("plug-in", "stock") if run % 2 == 0 else ("stock", "plug-in"):
            times[mode].append(time_import(disable=mode == "stock"))
            print(f"run {run + 1} {mode:<8} {times[mode][-1]:.3f} s", flush=True)
    med = {mode: statistics.median(t) for mode, t in times.items()}
    ratio = med["plug-in"] / med["stock"]
    print(f"median: plug-in {med['plug-in']:.3f} s, stock {med['stock']:.3f} s, ratio {ratio:.3f}x "
          f"({args.runs} interleaved runs each)")
    return 0 if ratio <= args.max_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
