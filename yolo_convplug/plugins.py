"""Users' own modules in every process: the ``yolo_convplug.modules`` entry-point group and ``$YOLO_CONVPLUG_MODULES``."""

from __future__ import annotations


def load_user_modules() -> None:
    """Import the modules that users' packages declare (entry points) or that the environment names."""
