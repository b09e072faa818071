"""Registry of the module names that Ultralytics' model parser should know.

Every module registers itself where its class is defined, ``@register(role=..., macs=..., paper=...)`` above the
class (as timm registers its layers); everything else (the parser patch, the swap tool, the ablation's variants, the
bench, ``convplug list``, the contract tests) reads this registry.

A registered class gets one of three roles, which decide how ``parse_model`` turns a YAML row into constructor
arguments:

- ``"conv"``: like Ultralytics ``Conv``: ``c1`` (input channels) is inserted and ``c2`` is width-scaled
  (``make_divisible(min(c2, max_channels) * width, 8)``), so ``[-1, 1, SAConv2d, [64, 3, 2]]`` builds
  ``SAConv2d(c1, 16, 3, 2)`` at scale n.
- ``"repeat"``: like ``C2f``: the same, plus the row's ``n`` (depth-scaled) inserted as the third argument.
- ``"keep"``: a channel-preserving layer (attention, gating): ``c1`` is inserted and the output has ``c1``
  channels; the YAML args follow ``c1`` verbatim.

Warm start (``pretrained=`` / ``BaseModel.load``): a module may define ``convert_from(self, stock) -> str``, which
sets *all* of its tensors from the stock Ultralytics layer it replaces (``Conv`` for the conv role, ``C2f``/``C3k2``
for the repeat role; a class attribute ``replaces`` overrides that) and returns a short description of what it did,
or raises :class:`ConversionError` to say it cannot (the layer then stays fresh).
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from typing import Callable, NamedTuple

ROLES = ("conv", "repeat", "keep")
# attributes Ultralytics' parse_model sets on every layer it builds (m.np, m.i, m.f, m.type)
RESERVED_ATTRIBUTES = ("f", "i", "type", "np")


class ConversionError(ValueError):
    """A module cannot start from the stock layer it replaces; the message says why."""


class Entry(NamedTuple):
    """A registered module: the class, its parser role, its thop FLOP rule and its paper."""

    cls: type
    role: str
    macs: Callable | None = None
    paper: str = ""


_ENTRIES: dict[str, Entry] = {}


def _ultralytics_defines(name: str) -> bool:
    """Whether Ultralytics' model parser already resolves ``name`` to one of its own objects."""
    tasks = sys.modules.get("ultralytics.nn.tasks")
    if tasks is None:
        import ultralytics.nn.modules as tasks  # the names parse_model sees come from here
    obj = getattr(tasks, name, None)
    return obj is not None and not any(obj is e.cls for e in _ENTRIES.values())


def _assigned_attributes(klass: type) -> set[str]:
    """Names the class defines or its ``__init__`` assigns as ``self.<name> = ...`` (empty if the source is hidden)."""
    names = {n for n in vars(klass) if not n.startswith("__")}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass.__init__)))
    except (OSError, TypeError, SyntaxError):
        return names
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                names.add(t.attr)
    return names


def register(
    cls: type | None = None,
    *,
    role: str = "conv",
    name: str | None = None,
    override: bool = False,
    macs: Callable | None = None,
    paper: str = "",
):
    """Make ``cls`` usable by name in Ultralytics model YAMLs; usable as ``@register`` or ``@register(role=...)``.

    Args:
        cls: an ``nn.Module`` subclass whose constructor follows the role's convention (see module docstring).
        role: ``"conv"``, ``"repeat"`` or ``"keep"``.
        name: the YAML name; defaults to ``cls.__name__``.
        override: allow a name Ultralytics already defines (ours then wins in YAMLs).
        macs: a thop rule ``macs(module, inputs, output)`` adding to ``module.total_ops`` the multiply-accumulates
            thop cannot see (convolutions with kernels computed in ``forward``), so Ultralytics' GFLOPs count them.
        paper: the citation shown by ``convplug list``.

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
        clash = sorted(_assigned_attributes(klass) & set(RESERVED_ATTRIBUTES))
        if clash:
            raise ValueError(
                f"register({key}): attribute(s) {', '.join(repr(c) for c in clash)} clash with what Ultralytics' "
                f"parser sets on every layer ({', '.join(RESERVED_ATTRIBUTES)}: from-index, layer index, type name, "
                "parameter count); rename them in your module"
            )
        if not override and _ultralytics_defines(key):
            raise ValueError(
                f"register({key}): Ultralytics already defines a module named {key!r}; "
                "pick another name or pass override=True"
            )
        previous = _ENTRIES.get(key)
        if previous is not None and previous.cls is not klass and not override:
            raise ValueError(f"register({key}): {key!r} is already registered to {previous.cls!r}; pass override=True")
        _ENTRIES[key] = Entry(klass, role, macs, paper)
        torch.serialization.add_safe_globals([klass])  # checkpoints load under ULTRALYTICS_SAFE_LOAD=1
        _add_thop_rule(klass, macs)
        tasks = sys.modules.get("ultralytics.nn.tasks")
        if tasks is not None:
            setattr(tasks, key, klass)  # parse_model resolves names through tasks' globals
        return klass

    return decorate(cls) if cls is not None else decorate


def _add_thop_rule(klass: type, macs: Callable | None) -> None:
    """Add ``macs`` to thop's table of counting rules (the counter behind Ultralytics' ``model.info()`` GFLOPs)."""
    if macs is None:
        return
    try:
        from thop.profile import register_hooks
    except ImportError:  # thop is optional in Ultralytics
        return
    register_hooks[klass] = macs


def unregister(name: str) -> None:
    """Forget ``name`` (mainly for tests of user registrations)."""
    entry = _ENTRIES.pop(name, None)
    tasks = sys.modules.get("ultralytics.nn.tasks")
    if entry is not None and tasks is not None and getattr(tasks, name, None) is entry.cls:
        delattr(tasks, name)


def registered() -> dict[str, Entry]:
    """A copy of the registry: name -> Entry(cls, role, macs, paper), the built-in modules included (their files are
    imported on first call: the package root imports them lazily)."""
    import yolo_convplug.modules  # noqa: F401  (importing the module files registers them)

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


def replaced_classes(cls: type, role: str) -> tuple[type, ...]:
    """The stock Ultralytics classes a module of ``role`` stands in for (``cls.replaces`` overrides the default)."""
    if hasattr(cls, "replaces"):
        return tuple(cls.replaces)
    from ultralytics.nn.modules import C2f, C3k2, Conv

    return {"conv": (Conv,), "repeat": (C2f, C3k2)}.get(role, ())
