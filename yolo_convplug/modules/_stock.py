"""What a warm start takes from the stock Ultralytics ``Conv`` a module replaces: its conv + BN pair, after checking
that the stock layer has the module's geometry and activation."""

from __future__ import annotations

import torch.nn as nn

from ..registry import ConversionError

CONV_FIELDS = dict(c1="in_channels", c2="out_channels", k="kernel_size", s="stride", p="padding", d="dilation",
                   g="groups")


def stock_conv_bn(module: str, stock: nn.Module, geometry: nn.Conv2d,
                  act: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """Return the stock layer's ``(conv, bn)`` if it matches ``geometry`` (an ``nn.Conv2d`` of the module's
    c1, c2, k, s, p, d, g; its weights are not read) and the activation type of ``act``.

    Raises:
        ConversionError: the stock layer is fused (no BN), or differs; the message lists every difference.
    """
    conv, bn = getattr(stock, "conv", None), getattr(stock, "bn", None)
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
        raise ConversionError(f"{type(stock).__name__} has no conv + bn pair (fused?); {module} needs both")
    mismatch = [f"{a}={getattr(conv, f)} vs {getattr(geometry, f)}" for a, f in CONV_FIELDS.items()
                if getattr(conv, f) != getattr(geometry, f)]
    stock_act = getattr(stock, "act", None)
    if type(stock_act) is not type(act):
        mismatch.append(f"act={type(stock_act).__name__} vs {type(act).__name__}")
    if mismatch:
        raise ConversionError(f"stock {type(stock).__name__} vs {module}: {', '.join(mismatch)}")
    return conv, bn


def copy_bn(target: nn.BatchNorm2d, source: nn.BatchNorm2d) -> None:
    """Copy a BatchNorm's parameters, statistics, ``eps`` and ``momentum``."""
    target.load_state_dict(source.state_dict())
    target.eps, target.momentum = source.eps, source.momentum
