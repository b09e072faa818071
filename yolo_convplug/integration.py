"""Teach Ultralytics' model parser the registered module names, without editing Ultralytics' files.

``parse_model`` decides how to build each YAML row by testing the module class against sets that are locals of
the function (``base_modules``/``repeat_modules`` in 8.3.x-8.4.x, inline set literals in early 8.3 releases).
:func:`patch_tasks` rewrites the function's syntax tree so that

- every set that contains ``Conv`` also contains the registered conv- and repeat-role classes,
- every set that contains ``C2f`` but not ``Conv`` (the "repeat" set) also contains the repeat-role classes,
- a new first branch builds keep-role classes (``c1`` inserted, channels kept),
- a top-level ``legacy: false`` in the YAML selects the modern (YOLO11) detection head even without ``C3k2``,

and compiles it back with the module's globals; everything else Ultralytics does is untouched. The result is
wrapped to check every row's module name first (unknown names get the closest known ones) and to re-raise a
construction error with the layer index, the module, its arguments and the expected signature.
"""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import re
import sys
import types

from .model_yaml import describe_row, row_error, rows
from .registry import ROLES, classes_with_role, registered, yaml_parameters
from .resolve import patch_yaml_lookup
from .ultralytics_compat import (
    SUPPORTED_RANGE,
    family_minimum,
    in_supported_range,
    installed_version,
    parse_version,
)
from .warm_start import patch_load

_HELPER = "_yolo_convplug_modules"  # injected into ultralytics.nn.tasks' globals, read by the patched parse_model


class UnsupportedUltralyticsError(RuntimeError):
    """The installed Ultralytics' ``parse_model`` does not have a shape this package knows how to extend."""


def ultralytics_version() -> str:
    return installed_version()


def _set_names(node: ast.AST) -> set[str] | None:
    """The names in a ``{A, B}`` or ``frozenset({A, B})`` expression, else None."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "frozenset" and node.args:
        node = node.args[0]
    if isinstance(node, ast.Set):
        return {e.id for e in node.elts if isinstance(e, ast.Name)}
    return None


def _helper_call(*roles: str) -> ast.Call:
    return ast.Call(ast.Name(_HELPER, ast.Load()), [ast.Constant(r) for r in roles], [])


class _ParseModelTransformer(ast.NodeTransformer):
    """Extends parse_model's membership sets with the registry (see module docstring)."""

    def __init__(self):
        self.conv_sets = 0
        self.repeat_sets = 0
        self.conv_set_names: set[str] = set()  # local variables bound to the extended Conv set, e.g. base_modules
        self.keep_branch = False
        self.legacy_hook = False
        self.conv_names: set[str] = set()  # Ultralytics' own modules in the sets that contain Conv
        self.repeat_names: set[str] = set()  # ... and in the sets that contain C2f (the repeat_modules)
        self.non_legacy_names: set[str] = set()  # X of every ``if m is X:`` branch that sets ``legacy = False``

    def visit_Assign(self, node):
        names = _set_names(node.value)
        self.generic_visit(node)
        if names and "Conv" in names:
            self.conv_set_names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        if [getattr(t, "id", None) for t in node.targets] == ["legacy"] and getattr(node.value, "value", 0) is True:
            self.legacy_hook = True
            hook = ast.parse('legacy = d.get("legacy", legacy)').body[0]
            return [node, ast.copy_location(hook, node)]
        return node

    def _extend(self, node):
        names = _set_names(node)
        if names is None or "Conv" not in names and "C2f" not in names:
            return None
        if "C2f" in names and "Conv" not in names:
            self.repeat_names |= names
        if "Conv" in names:
            self.conv_names |= names
            self.conv_sets += 1
            extra = _helper_call("conv", "repeat")
        else:
            self.repeat_sets += 1
            extra = _helper_call("repeat")
        return ast.copy_location(ast.BinOp(node, ast.BitOr(), extra), node)

    def visit_Call(self, node):
        return self._extend(node) or self.generic_visit(node)

    def visit_Set(self, node):
        return self._extend(node) or self.generic_visit(node)

    def visit_If(self, node):
        test = node.test
        if isinstance(test, ast.Compare) and isinstance(test.ops[0], ast.Is) and any(
            isinstance(s, ast.Assign) and getattr(s.targets[0], "id", None) == "legacy"
            and getattr(s.value, "value", None) is False
            for s in node.body
        ) and isinstance(test.comparators[0], ast.Name):  # fmt: skip
            self.non_legacy_names.add(test.comparators[0].id)
        is_conv_branch = (
            isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name)
            and test.left.id == "m"
            and isinstance(test.ops[0], ast.In)
            and (
                (isinstance(test.comparators[0], ast.Name) and test.comparators[0].id in self.conv_set_names)
                or "Conv" in (_set_names(test.comparators[0]) or ())
            )
        )
        self.generic_visit(node)
        if not is_conv_branch or self.keep_branch:
            return node
        self.keep_branch = True
        keep = ast.parse(f'if m in {_HELPER}("keep"):\n    c2 = ch[f]\n    args = [c2, *args]').body[0]
        keep.orelse = [node]
        return ast.fix_missing_locations(ast.copy_location(keep, node))


def _patched_parse_model(tasks: types.ModuleType):
    """Compile the extended ``parse_model`` against ``tasks``' globals; raise if its shape is not recognised."""
    original = tasks.parse_model
    try:
        source = inspect.getsource(original)
        first_line = inspect.getsourcelines(original)[1]
    except (OSError, TypeError) as e:
        raise UnsupportedUltralyticsError(_unsupported(f"the source of parse_model is unavailable ({e})")) from None
    tree = ast.parse(source)
    transformer = _ParseModelTransformer()
    tree = ast.fix_missing_locations(transformer.visit(tree))
    if not (transformer.conv_sets and transformer.repeat_sets and transformer.keep_branch):
        raise UnsupportedUltralyticsError(
            _unsupported(
                f"parse_model's shape was not recognised (Conv sets: {transformer.conv_sets}, C2f repeat sets: "
                f"{transformer.repeat_sets}, Conv branch found: {transformer.keep_branch})"
            )
        )
    _ROLES.update({n: "repeat" for n in transformer.repeat_names})
    _ROLES.update({n: "conv" for n in transformer.conv_names - transformer.repeat_names})
    _NON_LEGACY.update(transformer.non_legacy_names)
    ast.increment_lineno(tree, first_line - 1)  # tracebacks point at the real lines of tasks.py
    namespace: dict = {}
    exec(compile(tree, inspect.getsourcefile(original) or "<parse_model>", "exec"), vars(tasks), namespace)
    return namespace["parse_model"]


def _unsupported(reason: str) -> str:
    return (
        f"yolo-convplug cannot extend Ultralytics {ultralytics_version()}: {reason}. Supported Ultralytics: "
        f"{SUPPORTED_RANGE}. Fix: pip install 'ultralytics{SUPPORTED_RANGE}'."
    )


# What the patch read in the installed parse_model: Ultralytics' own module name -> "conv"/"repeat", and the modules
# whose presence selects the modern (non-legacy) Detect head
_ROLES: dict[str, str] = {}
_NON_LEGACY: set[str] = set()


def _read_parser() -> None:
    if not _ROLES:
        import ultralytics.nn.tasks  # noqa: F401  (importing patches it, which fills _ROLES and _NON_LEGACY)

        patch_tasks()


def ultralytics_roles() -> dict[str, str]:
    """Ultralytics' own module names by parser role, as the installed ``parse_model`` lists them: ``repeat`` for its
    ``repeat_modules`` (``C2f``, ``C3k2``, ...: the parser inserts ``n``), ``conv`` for the rest of the set that
    holds ``Conv`` (``c1`` inserted, ``c2`` width-scaled)."""
    _read_parser()
    return dict(_ROLES)


def non_legacy_modules() -> frozenset[str]:
    """The modules whose presence makes Ultralytics build the modern Detect head: those whose ``if m is X:`` branch
    in the installed ``parse_model`` sets ``legacy = False`` (C3k2, A2C2f, C2fCIB in 8.4)."""
    _read_parser()
    return frozenset(_NON_LEGACY)


def _sync_names(tasks: types.ModuleType, d: dict) -> None:
    """Import users' modules, and the built-in module files when a row of ``d`` names a module the parser does not
    know yet (a stock YAML then imports nothing Ultralytics would not); expose every registered class in ``tasks``."""
    # Imported here, not at the top: the start-up hook patches ``tasks`` while Ultralytics is still importing it
    # (8.3.0 imports ``tasks`` eagerly from its package root), and our module files import Ultralytics' Conv/C2f.
    from . import registry
    from .plugins import load_user_modules

    load_user_modules()
    names = {row[2] for row in rows(d) if isinstance(row, (list, tuple)) and len(row) > 2 and isinstance(row[2], str)}
    unknown = {n for n in names if not n.startswith(("nn.", "torchvision.ops.")) and n not in vars(tasks)}
    entries = registry.registered() if unknown else dict(registry._ENTRIES)
    for name, entry in entries.items():
        setattr(tasks, name, entry.cls)


def _check_rows(d: dict, tasks: types.ModuleType) -> None:
    """Check every row's shape and module name before Ultralytics starts building."""
    import torch

    known = [k for k, v in vars(tasks).items() if isinstance(v, type) and issubclass(v, torch.nn.Module)]
    for i, row in enumerate(rows(d)):
        if not (isinstance(row, (list, tuple)) and len(row) == 4 and isinstance(row[3], list)):
            raise row_error(i, row, "each row must be [from, repeats, module, [args]]")
        name = row[2]
        if not isinstance(name, str):
            raise row_error(i, row, f"the module must be a name, got {type(name).__name__}")
        if name.startswith(("nn.", "torchvision.ops.")) or name in vars(tasks):
            _check_args_present(i, row, getattr(tasks, name, None))
            continue
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise row_error(
            i,
            row,
            f"unknown module {name!r}.{hint} Your own module: decorate it with @yolo_convplug.register(role=...) "
            "and import it before building the model.",
        )


def _role_of(m, frame: dict | None = None) -> str | None:
    """The parser role of class ``m``: from the registry, else from Ultralytics' own sets."""
    role = next((r for r in ROLES if m in classes_with_role(r)), None)
    if role is None and frame is not None:  # the live sets of the failing parse (8.3.100+ names them)
        repeat, conv = frame.get("repeat_modules", ()), frame.get("base_modules", ())
        role = "repeat" if m in repeat else "conv" if m in conv else None
    return role or _ROLES.get(getattr(m, "__name__", None))


def _check_args_present(i: int, row, m) -> None:
    """A conv/repeat-role row needs at least ``c2``: say so instead of the parser's ``IndexError``."""
    role = _role_of(m)
    if row[3] or role not in ("conv", "repeat"):
        return
    raise row_error(i, row, f"{row[2]} needs at least its output channels c2 as the first argument, e.g. "
                            f"[{row[0]}, {row[1]}, {row[2]}, [64]].{_expected_args(m, {})}")


def _failing_layer(tb, code: types.CodeType):
    """The locals of the patched parse_model frame in a traceback, if the error happened while building a layer."""
    while tb is not None:
        if tb.tb_frame.f_code is code:
            return tb.tb_frame.f_locals
        tb = tb.tb_next
    return None


def _expected_args(m, frame: dict) -> str:
    """The YAML arguments ``m`` takes, without those the parser inserts (c1; and n for repeat modules)."""
    role = _role_of(m, frame)
    params = yaml_parameters(m, role)
    if params is None:
        return ""
    names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    where = "after the inserted input channels c1" if role else "as written"
    if role == "repeat":
        where += " and repeats n"
    return f" Expected YAML args ({where}): [{', '.join(names)}]."


# What a wrong row (argument count or type, channel arithmetic, an index into ``ch``) raises while its layer is built
YAML_MISTAKES = (TypeError, ValueError, IndexError, KeyError, AssertionError)


def _is_yaml_mistake(m, error: Exception) -> bool:
    """Whether ``error``, raised while building a layer of class ``m``, reports the row rather than the environment:
    any error of a built-in module of ours (their argument checks), else one of ``YAML_MISTAKES``."""
    ours = getattr(m, "__module__", "").startswith("yolo_convplug.modules")
    return ours or isinstance(error, YAML_MISTAKES)


def _add_note(error: Exception, note: str) -> None:
    """``error.add_note(note)`` (Python 3.11+: shown under the traceback); older Pythons keep it in ``__notes__``."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:
        error.__notes__ = [*getattr(error, "__notes__", []), note]


def _check_family(d: dict) -> None:
    """A model family newer than the installed Ultralytics (YOLO26 on 8.3) is refused by name before any layer."""
    name = str(d.get("yaml_file") or "")
    need = family_minimum(name)
    if need and parse_version(ultralytics_version())[: len(need)] < need:
        family = re.match(r"[a-z]+\d+", name.rsplit("/", 1)[-1].lower()).group(0).upper()
        raise UnsupportedUltralyticsError(
            f"{family} YAMLs need Ultralytics >= {'.'.join(map(str, need))} (installed: {ultralytics_version()}); "
            f"{name} cannot be built here. Fix: pip install -U 'ultralytics{SUPPORTED_RANGE}'."
        )


def _make_wrapper(tasks: types.ModuleType, patched, original):
    @functools.wraps(original)
    def parse_model(d, ch, verbose=True):
        _check_family(d)
        _sync_names(tasks, d)
        _check_rows(d, tasks)
        try:
            return patched(d, ch, verbose)
        except Exception as e:
            frame = _failing_layer(e.__traceback__, patched.__code__)
            if frame is None or "i" not in frame:
                raise
            i, m = frame["i"], frame.get("m")
            layers = rows(d)
            row = layers[i] if i < len(layers) else None
            name = getattr(m, "__name__", m)
            if not _is_yaml_mistake(m, e):  # e.g. a stock layer's download error: its type is what callers catch
                _add_note(e, f"yolo-convplug: raised while building {describe_row(i, row)} ({name})")
                raise
            message = (
                f"{name} could not be built with arguments {frame.get('args')!r} "
                f"({type(e).__name__}: {e}).{_expected_args(m, frame)}"
            )
            err = row_error(i, row, message)
            err.original, err.layer = e, i
            raise err from None

    parse_model.__wrapped__ = original
    parse_model._yolo_convplug = True
    return parse_model


def _unsupported_wrapper(tasks: types.ModuleType, original, error: Exception):
    """Fallback when the shape is unknown: stock models still build; a YAML naming our modules gets ``error``."""

    @functools.wraps(original)
    def parse_model(d, ch, verbose=True):
        names = {row[2] for row in rows(d) if len(row) == 4}
        if names & set(registered()):
            raise UnsupportedUltralyticsError(str(error))
        return original(d, ch, verbose)

    parse_model._yolo_convplug = True
    return parse_model


def _fuse_plugins(model) -> None:
    """Fold BN in every registered module that can (``fuse()`` is idempotent), before Ultralytics' own fuse."""
    plugin_classes = tuple(e.cls for e in registered().values())
    for m in list(model.modules()):
        if isinstance(m, plugin_classes) and callable(getattr(m, "fuse", None)):
            m.fuse()


def _patch_fuse(tasks: types.ModuleType) -> None:
    original = tasks.BaseModel.fuse
    if getattr(original, "_yolo_convplug", False):
        return

    @functools.wraps(original)
    def fuse(self, *args, **kwargs):
        _fuse_plugins(self)
        return original(self, *args, **kwargs)

    fuse._yolo_convplug = True
    tasks.BaseModel.fuse = fuse


def _patch_checkpoint_load(tasks: types.ModuleType) -> None:
    """Import (register) the built-in modules before ``tasks`` unpickles a checkpoint: registration allow-lists each
    class for ``torch.load(weights_only=True)``, and the module files are otherwise imported only when needed."""
    original = getattr(tasks, "torch_load", None)
    if original is None or getattr(original, "_yolo_convplug", False):
        return

    @functools.wraps(original)
    def torch_load(*args, **kwargs):
        import yolo_convplug.modules  # noqa: F401

        return original(*args, **kwargs)

    torch_load._yolo_convplug = True
    tasks.torch_load = torch_load


def patch_tasks(tasks: types.ModuleType | None = None) -> None:
    """Patch ``ultralytics.nn.tasks`` (idempotent). Called by the start-up hook and by ``import yolo_convplug``.

    Raises:
        UnsupportedUltralyticsError: the installed Ultralytics has a ``parse_model`` of unknown shape; stock models
            keep working and a YAML that names one of our modules raises the same error.
    """
    if tasks is None:
        import ultralytics.nn.tasks as tasks
    if getattr(tasks.parse_model, "_yolo_convplug", False):
        return
    original = tasks.parse_model
    setattr(tasks, _HELPER, lambda *roles: frozenset().union(*(classes_with_role(r) for r in roles)))
    _patch_fuse(tasks)
    _patch_checkpoint_load(tasks)
    patch_load(tasks)
    __import__("importlib").import_module(".calibrate", __package__).install()  # calibrated warm start, training
    __import__("importlib").import_module(".train_epoch", __package__).install()  # epoch schedules (ODConv)
    patch_yaml_lookup(tasks)
    try:
        patched = _patched_parse_model(tasks)
    except UnsupportedUltralyticsError as e:
        tasks.parse_model = _unsupported_wrapper(tasks, original, e)
        raise
    if not in_supported_range(ultralytics_version()):
        print(
            f"WARNING yolo-convplug: Ultralytics {ultralytics_version()} is outside the tested range "
            f"{SUPPORTED_RANGE}; its parser shape was recognised, so the modules are enabled.",
            file=sys.stderr,
        )
    tasks.parse_model = _make_wrapper(tasks, patched, original)
