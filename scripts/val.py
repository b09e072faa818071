#!/usr/bin/env python
"""Validate a trained model with Ultralytics' validator: see ``python scripts/val.py --help``."""

from yolo_convplug.research.workflow import val_main

if __name__ == "__main__":
    raise SystemExit(val_main())
