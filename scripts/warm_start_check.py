#!/usr/bin/env python
"""Load a stock checkpoint into plug-in model YAMLs and report mAP50-95 before fine-tuning and per-layer fidelity.

Example: python scripts/warm_start_check.py runs/stock/weights/best.pt --data shapes-data.yaml
"""

import sys

from yolo_convplug.research.conversion import main

if __name__ == "__main__":
    sys.exit(main())
