"""Registry of the module names that Ultralytics' model parser should know.

A registered class gets one of three roles, which decide how ``parse_model`` turns a YAML row into constructor
arguments:

- ``"conv"``: like Ultralytics ``Conv``: ``c1`` (input channels) is inserted and ``c2`` is width-scaled
  (``make_divisible(min(c2, max_channels) * width, 8)``), so ``[-1, 1, SAConv2d, [64, 3, 2]]`` builds
  ``SAConv2d(c1, 16, 3, 2)`` at scale n.
- ``"repeat"``: like ``C2f``: the same, plus the row's ``n`` (depth-scaled) inserted as the third argument.
- ``"keep"``: a channel-preserving layer (attention, gating): ``c1`` is inserted and the output has ``c1``
  channels; the YAML args follow ``c1`` verbatim.

The registry only holds classes; :mod:`yolo_convplug.integration` teaches Ultralytics to read it.
"""

from __future__ import annotations

import inspect
import sys
from typing import NamedTuple

ROLES = ("conv", "repeat", "keep")


class Entry(NamedTuple):
    """A registered module: the class and its parser role."""

    cls: type
    role: str


_ENTRIES: dict[str, Entry] = {}


def _ultralytics_defines(name: str) -> bool:
    """Whether Ultralytics' model parser already resolves ``name`` to one of its own objects."""
    tasks = sys.modules.get("ultralytics.nn.tasks")
    if tasks is None:
        import ultralytics.nn.modules as tasks  # the names parse_model sees come from here
    obj = getattr(tasks, name, None)
    return obj is not None and not any(obj is e.cls for e in _ENTRIES.values())


def register(cls: type | None = None, *, role: str = "conv", name: str | None = None, override: bool = False):
    """Make ``cls`` usable by name in Ultralytics model YAMLs; usable as ``@register`` or ``@register(role=...)``.

    Args:
        cls: an ``nn.Module`` subclass whose constructor follows the role's convention (see module docstring).
        role: ``"conv"``, ``"repeat"`` or ``"keep"``.
        name: the YAML name; defaults to ``cls.__name__``.
        override: allow a name Ultralytics already defines (ours then wins in YAMLs).

    Returns:
        ``cls`` unchanged (or a decorator when ``cls`` is omitted).
    """

    def decorate(klass: type) -> type:
        import torch

        key = name or klass.__name__
        if role not in ROLES:
            raise ValueError(f"register({key}): role={role!r} is not valid; use one of {', '.join(ROLES)}")
        if not (isinstance(klass, type) and issubclass(klass, torch.nn.Module)):
            raise TypeError(f"register({key}): {klass!r} is not an nn.Module subclass")
        if not override and _ultralytics_defines(key):
            raise ValueError(
                f"register({key}): Ultralytics already defines a module named {key!r}; "
                "pick another name or pass override=True"
            )
        previous = _ENTRIES.get(key)
        if previous is not None and previous.cls is not klass and not override:
            raise ValueError(f"register({key}): {key!r} is already registered to {previous.cls!r}; pass override=True")
        _ENTRIES[key] = Entry(klass, role)
        torch.serialization.add_safe_globals([klass])  # checkpoints load under ULTRALYTICS_SAFE_LOAD=1
        tasks = sys.modules.get("ultralytics.nn.tasks")
        if tasks is not None:
            setattr(tasks, key, klass)  # parse_model resolves names through tasks' globals
        return klass

    return decorate(cls) if cls is not None else decorate


def unregister(name: str) -> None:
    """Forget ``name`` (mainly for tests of user registrations)."""
    entry = _ENTRIES.pop(name, None)
    tasks = sys.modules.get("ultralytics.nn.tasks")
    if entry is not None and tasks is not None and getattr(tasks, name, None) is entry.cls:
        delattr(tasks, name)


def registered() -> dict[str, Entry]:
    """A copy of the registry: name -> Entry(cls, role)."""
    return dict(_ENTRIES)


def yaml_parameters(cls: type, role: str | None) -> list[inspect.Parameter] | None:
    """The constructor parameters a YAML row's args fill: those after the parser-inserted ``c1`` (conv, keep roles)
    and ``n`` (repeat role); all of them for a module without a role; None when the signature cannot be read."""
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return None
    if role == "repeat":
        return params[1:2] + params[3:]
    return params[1:] if role in ("conv", "keep") else params


def classes_with_role(role: str) -> frozenset:
    """The registered classes that have ``role``."""
    return frozenset(e.cls for e in _ENTRIES.values() if e.role == role)

