#!/usr/bin/env python
"""Ablation: train the baseline and module variants with identical settings and seeds; write a table and a plot.

Variants (positional; the first is the baseline): our short names saconv, dsconv, scconv, condconv, c2f-faster
(-> model_yamls/yolov8<scale>-<name>.yaml), 'baseline' (-> yolov8<scale>.yaml), any model YAML path, or an
Ultralytics built-in such as yolo11n.yaml. Default: baseline plus all five.

Outputs in --out: results.csv (one row per run), results.md (mean ± std per variant), results.png (mAP50-95 vs
CPU latency and vs GFLOPs), and runs/<variant>/seed<k>/ with Ultralytics' files and train.log. Rerunning the same
command reuses finished runs (done.json) and redoes interrupted ones, so it is safe to stop and resume.

Time: on a 2-core CPU one run at the defaults (shapes: 256 train / 64 val images, imgsz 160, 20 epochs) takes
about 2.5 minutes for yolov8n and each of our five variants (measured: 130-200 s), so the six default variants take
about 15 minutes per seed; other load on the machine makes it slower. On a GPU (device=0) these runs take seconds per
epoch, Ultralytics enables AMP, and latency is also reported on the GPU. The default hyperparameters are tuned for
such short from-scratch runs (AdamW lr0=0.003, lrf=0.2, one warm-up epoch, nbs=batch); for long runs on real data
pass e.g. data=coco128.yaml imgsz=640 epochs=100 optimizer=auto lrf=0.01 warmup_epochs=3 nbs=64, ideally on a GPU.

Examples:
  python scripts/ablate.py                                  # all variants on shapes, 20 epochs, imgsz 160
  python scripts/ablate.py baseline saconv --seeds 0 1 2    # mean ± std over three seeds
  python scripts/ablate.py data=coco128.yaml epochs=100 imgsz=640 device=0 --out runs/ablate-coco
"""

import argparse

from yolo_convplug.ablate import PLUGINS, TRAIN_DEFAULTS, ablate
from yolo_convplug.workflow import parse_overrides


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "args",
        nargs="*",
        metavar="VARIANT | key=value",
        help=f"variants (baseline, {', '.join(PLUGINS)}, or YAML paths) and Ultralytics train arguments; defaults: "
        + " ".join(f"{k}={v}" for k, v in TRAIN_DEFAULTS.items()),
    )
    p.add_argument(
        "--data", default="shapes", help="'shapes' (default), a data YAML, or 'coco128' for COCO128 resolution"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (several give mean ± std)")
    p.add_argument("--out", default="runs/ablate", help="output folder (default runs/ablate)")
    p.add_argument("--scale", default="n", help="scale letter for baseline and short variant names (default n)")
    p.add_argument("--latency-runs", type=int, default=50, help="timed forward passes per latency figure")
    p.add_argument("--latency-threads", type=int, default=1, help="torch threads for CPU latency (default 1)")
    p.add_argument("--verbose", action="store_true", help="show Ultralytics' output instead of writing train.log")
    a = p.parse_intermixed_args(argv)
    variants = [x for x in a.args if "=" not in x]
    kw = parse_overrides([x for x in a.args if "=" in x])
    data = kw.pop("data", a.data)
    seeds = kw.pop("seed", None)
    ablate(
        variants or None,
        data=None if data == "coco128" else data,
        out=kw.pop("out", a.out),
        seeds=[seeds] if isinstance(seeds, int) else a.seeds,
        scale=a.scale,
        latency_runs=a.latency_runs,
        latency_threads=a.latency_threads,
        quiet=not a.verbose,
        **kw,
    )


if __name__ == "__main__":
    main()
