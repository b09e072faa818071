"""yolo-convplug: published convolution modules as plug-ins for Ultralytics YOLO.

The start-up hook installed with the package (``yolo_convplug_autoload.pth``) patches Ultralytics' model parser in
every Python process that imports Ultralytics; the module files (and what they import) load when a model first
needs them (a YAML row naming a module the parser does not know, ``registered()``, a checkpoint holding our layers,
or an attribute such as ``yolo_convplug.SAConv2d``), so ``from ultralytics import YOLO`` stays as light as stock.
Model YAMLs can name every module in :func:`registered` (each module file registers its classes where defined).
"""

from __future__ import annotations

import importlib

from .integration import UnsupportedUltralyticsError, patch_tasks
from .model_yaml import ModelYamlError
from .registry import ConversionError, register, registered, unregister

__version__ = "0.3.0"

_MODULE_CLASSES = ("SAConv2d", "DSConv2d", "ScConv", "CondConv", "ODConv", "PConv", "FasterBlock", "C2f_Faster",
                   "SPDConv", "SPConv", "AKConv", "DySnakeConv", "DCNv2", "DiverseBranchBlock", "ConvControl")


def __getattr__(name: str):
    """The module classes (``yolo_convplug.SAConv2d``, ``from yolo_convplug import ScConv``), imported on first use."""
    modules = importlib.import_module(".modules", __name__)
    if name in modules.__all__:
        return getattr(modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *importlib.import_module(".modules", __name__).__all__})


patch_tasks()

__all__ = (
    *_MODULE_CLASSES,
    "register",
    "registered",
    "unregister",
    "patch_tasks",
    "ConversionError",
    "ModelYamlError",
    "UnsupportedUltralyticsError",
)
