"""Small helpers shared by the convolution modules: activation resolution, argument checks, BN folding."""

from __future__ import annotations

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


def require(condition: bool, module: str, argument: str, value, fix: str) -> None:
    """Raise a ``ValueError`` that names the module, the argument, its value and what would work."""
    if not condition:
        raise ValueError(f"{module}: {argument}={value!r} is not valid; {fix}")


def require_int(module: str, argument: str, value, minimum: int = 1) -> None:
    """Check that ``value`` is an int (bools excluded) of at least ``minimum``."""
    require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        module,
        argument,
        value,
        f"it must be an integer >= {minimum}",
    )


def fuse_convs(module: nn.Module) -> nn.Module:
    """Fold the BN of every Ultralytics ``Conv`` inside ``module`` into its conv, as ``BaseModel.fuse`` does."""
    for m in module.modules():
        if isinstance(m, Conv) and hasattr(m, "bn"):
            m.conv = fuse_conv_and_bn(m.conv, m.bn)
            delattr(m, "bn")
            m.forward = m.forward_fuse
    return module
