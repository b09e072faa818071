"""yolo-convplug: published convolution modules as plug-ins for Ultralytics YOLO.

Importing the package registers the modules with Ultralytics' model parser; the start-up hook installed with the
package (``yolo_convplug_autoload.pth``) does the same in every Python process that imports Ultralytics, so model
YAMLs can name every module in :func:`registered` (each module file registers its classes where they are defined).
"""

from .integration import UnsupportedUltralyticsError, patch_tasks
from .model_yaml import ModelYamlError
from .modules import *  # noqa: F403  (importing the module files registers them)
from .modules import __all__ as _modules
from .registry import ConversionError, register, registered, unregister

__version__ = "0.2.0"

patch_tasks()

__all__ = (
    *_modules,
    "register",
    "registered",
    "unregister",
    "patch_tasks",
    "ConversionError",
    "ModelYamlError",
    "UnsupportedUltralyticsError",
)
