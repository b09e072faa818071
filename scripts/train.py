#!/usr/bin/env python
"""Train any model YAML (ours, Ultralytics' built-ins or your own) with Ultralytics' trainer.

Examples:
  python scripts/train.py model_yamls/yolov8n-saconv.yaml epochs=100
  python scripts/train.py c2f-faster --data shapes epochs=10 imgsz=160   # short name of one of our YAMLs
  python scripts/train.py yolov8n.yaml --data shapes epochs=10 imgsz=160
  python scripts/train.py my_model.yaml --data path/to/data.yaml device=0 batch=32
"""

import argparse

from yolo_convplug.workflow import parse_overrides, train


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "model",
        nargs="?",
        default="yolov8n.yaml",
        help="model YAML, checkpoint, Ultralytics name or our short name such as saconv (default yolov8n.yaml)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="data YAML, 'shapes' (synthetic, offline) or 'shapes:train=N,val=N,imgsz=N'; default: $CONVPLUG_COCO128, "
        "else coco128.yaml (downloaded by Ultralytics), else shapes when offline",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="Ultralytics train arguments, e.g. epochs=10")
    a = p.parse_intermixed_args(argv)
    kw = parse_overrides(a.overrides)
    metrics = train(a.model, kw.pop("data", a.data), **kw)
    if metrics is not None:
        print(f"mAP50 {metrics.box.map50:.4f}  mAP50-95 {metrics.box.map:.4f}  saved to {metrics.save_dir}")


if __name__ == "__main__":
    main()
