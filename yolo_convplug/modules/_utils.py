"""Small helpers shared by the convolution modules: activation resolution, argument checks, BN folding."""

from __future__ import annotations

import torch
import torch.nn as nn
from ultralytics.nn.modules.conv import Conv
from ultralytics.utils.torch_utils import fuse_conv_and_bn


def resolve_act(act) -> nn.Module:
    """Return the activation the Ultralytics ``Conv`` convention asks for.

    ``True`` gives ``Conv.default_act`` (SiLU unless the YAML's ``activation:`` changed it), a module gives that
    module, anything falsy gives ``nn.Identity()``.
    """
    if act is True:
        return Conv.default_act
    if isinstance(act, nn.Module):
        return act
    if act in (False, None):
        return nn.Identity()
    raise ValueError(f"act={act!r} is not valid: use True (default activation), False (none) or an nn.Module")


def spatial_mean(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Mean of ``x`` (B, C, H, W) over the map as ``sum / (H * W)``: the gradient of a sum is a broadcast view, the
    gradient of ``mean`` a materialised full-size tensor (one pass over the map more in every backward)."""
    return x.sum((2, 3), keepdim=keepdim) / (x.shape[2] * x.shape[3])


def require(condition: bool, module: str, argument: str, value, fix: str) -> None:
    """Raise a ``ValueError`` that names the module, the argument, its value and what would work."""
    if not condition:
        raise ValueError(f"{module}: {argument}={value!r} is not valid; {fix}")


def require_centred_kernel(module: str, k, p, g, d, no_groups: str, no_dilation: str) -> None:
    """The checks of a module whose taps align at the kernel's centre: an odd ``k``, 'same' padding, and, as
    ``no_groups`` and ``no_dilation`` say why, ``g = d = 1``."""
    require(k % 2 == 1, module, "k", k, "use an odd kernel size (1, 3, 5, ...): the taps align at its centre")
    require(p is None or p == k // 2, module, "p", p, f"leave p=None ('same' padding {k // 2}): the taps align")
    require(g == 1, module, "g", g, f"use g=1 ({no_groups})")
    require(d == 1, module, "d", d, f"use d=1 ({no_dilation})")


def require_int(module: str, argument: str, value, minimum: int = 1) -> None:
    """Check that ``value`` is an int (bools excluded) of at least ``minimum``."""
    require(
        _is_int(value) and value >= minimum,
        module,
        argument,
        value,
        f"it must be an integer >= {minimum}",
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require_number(module: str, argument: str, value, low: float, high: float, fix: str,
                   low_open: bool = False, high_open: bool = False) -> None:
    """Check that ``value`` is a real number (bools excluded) in [low, high]; ``*_open`` excludes that end."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    require(ok, module, argument, value, fix)


def check_conv_args(module: str, c1, c2, k, s, p=None, g=1, d=1, min_channels: int = 1) -> None:
    """The checks every conv-role module makes of the Ultralytics ``Conv(c1, c2, k, s, p, g, d)`` arguments.

    ``c1``, ``c2``, ``k``, ``s``, ``g``, ``d`` are integers >= 1 (``c1``/``c2`` >= ``min_channels``), ``p`` is
    ``None`` (``autopad``) or an integer >= 0, and ``g`` divides both channel counts. A module with further limits
    (odd ``k``, ``g == 1``, "same" padding) checks them after this call.
    """
    for argument, value in (("c1", c1), ("c2", c2)):
        require_int(module, argument, value, min_channels)
    for argument, value in (("k", k), ("s", s), ("g", g), ("d", d)):
        require_int(module, argument, value)
    require(p is None or (_is_int(p) and p >= 0), module, "p", p, "use None (autopad) or an integer >= 0")
    require(c1 % g == 0 and c2 % g == 0, module, "g", g, f"groups must divide c1={c1} and c2={c2}")


def fuse_own_bn(module: nn.Module) -> nn.Module:
    """Fold ``module.bn`` into ``module.conv`` (exact in eval), delete the BN and switch ``forward`` to
    ``forward_fuse``, as Ultralytics' ``Conv`` is fused; a second call does nothing."""
    if hasattr(module, "bn"):
        module.conv = fuse_conv_and_bn(module.conv, module.bn)
        del module.bn
        module.forward = module.forward_fuse
    return module


def fuse_convs(module: nn.Module) -> nn.Module:
    """Fold the BN of every Ultralytics ``Conv`` inside ``module`` into its conv, as ``BaseModel.fuse`` does."""
    for m in module.modules():
        if isinstance(m, Conv) and hasattr(m, "bn"):
            m.conv = fuse_conv_and_bn(m.conv, m.bn)
            delattr(m, "bn")
            m.forward = m.forward_fuse
    return module
