#!/usr/bin/env python
"""Train any model YAML with Ultralytics' trainer: see ``python scripts/train.py --help``."""

from yolo_convplug.research.workflow import train_main

if __name__ == "__main__":
    raise SystemExit(train_main())
