"""A control plug-in: exactly Ultralytics' ``Conv``, reached through the plug-in path.

The fine-tuning ablation loads stock weights into a plug-in YAML (conversion, a separate ``model.<i>`` transfer, the
calibration callback, a module class of ours) and compares it with the baseline. ``ConvControl`` goes through all of
that but computes what the stock layer computes, so its difference to the baseline is the protocol's own bias and
noise: a variant's difference is only a finding if it is larger than the control's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from ultralytics.nn.modules.conv import Conv

from ..registry import register
from ._stock import copy_bn, stock_conv_bn
from ._utils import check_conv_args


@register(role="conv", paper="control: Ultralytics Conv through the plug-in warm-start path")
class ConvControl(Conv):
    """``act(BN(conv(x)))``: Ultralytics ``Conv(c1, c2, k, s, p, g, d, act)`` itself (same forward, fuse, FLOPs).

    ``convert_from(conv)`` copies every tensor of a stock ``Conv`` of the same shape, so the converted layer's output
    equals the stock layer's bit for bit.
    """

    conversion_error = 0.0

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        """Check the arguments as every conv-role module does, then build Ultralytics' Conv."""
        check_conv_args(type(self).__name__, c1, c2, k, s, p, g, d)
        super().__init__(c1, c2, k, s, p, g, d, act)

    @torch.no_grad()
    def convert_from(self, stock: nn.Module) -> str:
        """Copy the stock Conv's kernel and BN (weights, running statistics, eps, momentum).

        Raises:
            ConversionError: the stock layer is fused (no BN) or differs in geometry or activation.
        """
        conv, bn = stock_conv_bn(type(self).__name__, stock, self.conv, self.act)
        self.conv.load_state_dict(conv.state_dict())
        copy_bn(self.bn, bn)
        return "every tensor copied"
