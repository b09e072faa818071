#!/usr/bin/env python
"""Swap blocks in any model YAML, keeping every layer index; the result is built with Ultralytics before it is written.

Examples:
  python scripts/swap.py yolov8.yaml Conv=SAConv2d --scope strided -o yolov8-saconv-all.yaml
  python scripts/swap.py yolo11n.yaml C3k2=C2f_Faster --scope backbone -o yolo11n-faster-backbone.yaml
  python scripts/swap.py my_model.yaml Conv=DSConv2d --scope 1,3,5-7 -o my_model-dsconv.yaml

Scope: all (default), backbone, head, strided (conv rows with stride > 1), or layer indices/ranges.
A swap must stay within a role (conv-like rows [c2, k, s] or C2f-like repeat rows); a swap that cannot build is
refused with the layer index, the module and the reason. Name the output with a scale letter (yolov8n-x.yaml) to
select that scale when Ultralytics loads it.
"""

import argparse
import sys

import yolo_convplug  # noqa: F401  (registers the plug-in modules with Ultralytics)
from yolo_convplug.swap import SwapError, swap_yaml


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="model YAML file or Ultralytics built-in name (yolov8.yaml, yolo11n.yaml, ...)")
    p.add_argument("rules", nargs="+", metavar="OLD=NEW", help="module swaps, e.g. Conv=SAConv2d C2f=C2f_Faster")
    p.add_argument("--scope", default="all", help="all, backbone, head, strided, or indices like 1,3,5-7")
    p.add_argument("-o", "--out", required=True, help="output YAML path")
    p.add_argument("--scale", default=None, help="scale letter to verify the build at (default: the source's)")
    a = p.parse_intermixed_args(argv)
    try:
        path = swap_yaml(a.source, a.rules, scope=a.scope, out=a.out, scale=a.scale)
    except SwapError as e:
        sys.exit(f"swap refused: {e}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
