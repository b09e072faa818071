"""Start-up hook of yolo-convplug: teach Ultralytics our module names in every Python process.

``yolo_convplug_autoload.pth`` (installed into site-packages) imports this module at interpreter start. It only
puts a meta-path finder in front of the import system, so it imports neither torch nor Ultralytics and costs
well under a millisecond. When ``ultralytics.nn.tasks`` is imported later (by the ``yolo`` CLI, the Python API,
a DDP worker or ``torch.load`` of a checkpoint), the finder lets the module load normally and then calls
``yolo_convplug.integration.patch_tasks`` on it (a failure there prints a warning and never breaks the import).
``YOLO_CONVPLUG_DISABLE=1`` turns the hook off.
"""

from __future__ import annotations

import os
import sys

TARGET = "ultralytics.nn.tasks"


class _TasksFinder:
    """Meta-path finder that wraps the loader of ``ultralytics.nn.tasks`` to patch it right after it executes."""

    _busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET or self._busy:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader)
        return spec


class _PatchingLoader:
    """Loader proxy: executes the real module, then patches it (a failed patch warns, never breaks the import)."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch(module)


def _patch(tasks) -> None:
    """Patch Ultralytics' parser; on failure warn once and leave Ultralytics working for its own models."""
    try:
        from yolo_convplug.integration import patch_tasks

        patch_tasks(tasks)
    except Exception as e:  # a broken plug-in must never break `import ultralytics`
        print(f"WARNING yolo-convplug: modules not registered with Ultralytics: {e}", file=sys.stderr)


def install() -> None:
    """Insert the finder once; patch at once if Ultralytics' model parser is already imported."""
    if os.environ.get("YOLO_CONVPLUG_DISABLE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return
    if TARGET in sys.modules:
        _patch(sys.modules[TARGET])
        return
    if not any(isinstance(f, _TasksFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TasksFinder())
