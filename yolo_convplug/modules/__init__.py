"""The convolution modules of yolo-convplug, one concept a file; importing a file registers its classes."""

from .akconv import AKConv
from .condconv import CondConv
from .control import ConvControl
from .dbb import DiverseBranchBlock
from .dcnv2 import DCNv2
from .dsconv import DSConv2d
from .dysnake import DySnakeConv
from .faster import C2f_Faster, FasterBlock, PConv
from .odconv import ODConv
from .saconv import SAConv2d
from .scconv import ScConv
from .spconv import SPConv
from .spdconv import SPDConv

__all__ = ("SAConv2d", "DSConv2d", "ScConv", "CondConv", "ODConv", "PConv", "FasterBlock", "C2f_Faster",
           "SPDConv", "SPConv", "AKConv", "DySnakeConv", "DCNv2", "DiverseBranchBlock", "ConvControl")
