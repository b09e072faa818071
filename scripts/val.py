#!/usr/bin/env python
"""Validate a trained model with Ultralytics' validator.

Examples:
  python scripts/val.py runs/detect/train/weights/best.pt
  python scripts/val.py best.pt --data shapes imgsz=160
"""

import argparse

from yolo_convplug.workflow import parse_overrides, val


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="trained checkpoint (.pt), or a model YAML for an untrained sanity check")
    p.add_argument(
        "--data",
        default=None,
        help="data YAML, 'shapes' or 'shapes:train=N,val=N,imgsz=N'; default: $CONVPLUG_COCO128, else coco128.yaml, "
        "else shapes when offline",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="Ultralytics val arguments, e.g. imgsz=640")
    a = p.parse_intermixed_args(argv)
    kw = parse_overrides(a.overrides)
    metrics = val(a.model, kw.pop("data", a.data), **kw)
    print(f"mAP50 {metrics.box.map50:.4f}  mAP50-95 {metrics.box.map:.4f}")


if __name__ == "__main__":
    main()
