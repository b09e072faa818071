"""FLOP counting for thop, the counter behind Ultralytics' ``model.info()`` GFLOPs.

thop counts the ``nn.Conv2d``/``nn.Linear`` modules a forward calls. SAConv2d, DSConv2d and CondConv convolve with
kernels they compute (``F.conv2d``), which thop would count as zero; these rules add those multiply-accumulates
(MACs; Ultralytics reports ``2 * MACs`` as FLOPs). Child modules the forward does call are counted by thop itself.
"""

from __future__ import annotations

import importlib


def _saconv_macs(m, x, y):
    """Two atrous convolutions with the layer's kernel shape."""
    m.total_ops += 2 * y.numel() * m.conv.weight[0].numel()


def _dsconv_macs(m, x, y):
    """One convolution with the quantised kernel; once fused, the fused ``nn.Conv2d`` child is counted by thop."""
    if hasattr(m, "bn"):
        m.total_ops += y.numel() * m.conv.weight[0].numel()


def _condconv_macs(m, x, y):
    """The per-sample convolution. Mixing the expert kernels (experts x kernel size per sample, independent of the
    image size) is left out: Ultralytics 8.3 counts at a stride-sized input and scales by resolution, which would
    inflate a size-independent term hundreds of times; at real sizes it is ~1-2% of the convolution."""
    m.total_ops += y.numel() * (m.weight.shape[1] // m.c2)


def register_thop_rules() -> None:
    """Add our rules to thop's table of counting rules (no-op where thop is not installed)."""
    try:
        thop_profile = importlib.import_module("thop.profile")
    except ImportError:
        return
    from .modules import CondConv, DSConv2d, SAConv2d

    thop_profile.register_hooks.update({SAConv2d: _saconv_macs, DSConv2d: _dsconv_macs, CondConv: _condconv_macs})
