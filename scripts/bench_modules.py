#!/usr/bin/env python
"""Every registered module against the stock layer it replaces: see ``python scripts/bench_modules.py --help``."""

from yolo_convplug.research.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
