#!/usr/bin/env python
"""Ablation of the module variants against the baseline: see ``python scripts/ablate.py --help``."""

from yolo_convplug.research.ablate import main

if __name__ == "__main__":
    raise SystemExit(main())
