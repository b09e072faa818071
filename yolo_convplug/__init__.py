"""yolo-convplug: published convolution modules as plug-ins for Ultralytics YOLO.

Importing the package registers the modules with Ultralytics' model parser; the start-up hook installed with the
package (``yolo_convplug_autoload.pth``) does the same in every Python process that imports Ultralytics, so model
YAMLs can name ``SAConv2d``, ``DSConv2d``, ``ScConv``, ``CondConv``, ``PConv``, ``FasterBlock`` and ``C2f_Faster``.
"""

from .flops import register_thop_rules
from .integration import ModelYamlError, UnsupportedUltralyticsError, patch_tasks
from .modules import C2f_Faster, CondConv, DSConv2d, FasterBlock, PConv, SAConv2d, ScConv
from .registry import register, registered, unregister

__version__ = "0.1.0"

for _cls in (SAConv2d, DSConv2d, ScConv, CondConv, PConv, FasterBlock):
    register(_cls, role="conv")
register(C2f_Faster, role="repeat")
del _cls

register_thop_rules()
patch_tasks()

__all__ = (
    "SAConv2d",
    "DSConv2d",
    "ScConv",
    "CondConv",
    "PConv",
    "FasterBlock",
    "C2f_Faster",
    "register",
    "registered",
    "unregister",
    "patch_tasks",
    "ModelYamlError",
    "UnsupportedUltralyticsError",
)
