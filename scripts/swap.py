#!/usr/bin/env python
"""Swap modules in any model YAML, keeping every layer index: the same as ``convplug swap`` (see its ``--help``)."""

import sys

from yolo_convplug.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["swap", *sys.argv[1:]]))
