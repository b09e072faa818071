"""Users' own modules in every process: the ``yolo_convplug.modules`` entry-point group and ``$YOLO_CONVPLUG_MODULES``.

A package that defines modules declares them, as Python plug-ins do, in its ``pyproject.toml``::

    [project.entry-points."yolo_convplug.modules"]
    my_modules = "my_package.modules"

and ad hoc, without packaging, ``YOLO_CONVPLUG_MODULES=my_modules,other.mod`` names modules to import. Both are
imported by :func:`load_user_modules` when Ultralytics' parser first builds a model (the start-up hook stays free of
imports); importing such a module runs its ``@yolo_convplug.register(...)`` decorators. A module that fails to
import is reported by name and never stops the others or the build.
"""

from __future__ import annotations

import importlib
import os
import sys

GROUP = "yolo_convplug.modules"
ENV = "YOLO_CONVPLUG_MODULES"
_done: set[str] = set()  # entry points and module names already imported (or reported as failing)


def _entry_points() -> list:
    from importlib.metadata import entry_points

    eps = entry_points()
    return list(eps.select(group=GROUP) if hasattr(eps, "select") else eps.get(GROUP, ()))  # Python 3.9: a dict


def _load(key: str, what: str, load) -> None:
    if key in _done:
        return
    _done.add(key)
    try:
        load()
    except Exception as e:  # one broken plug-in must not stop the others or the model build
        print(f"WARNING yolo-convplug: {what} failed to import, its modules are not registered: "
              f"{type(e).__name__}: {e}", file=sys.stderr)


def load_user_modules() -> None:
    """Import every entry point of group ``yolo_convplug.modules`` and every module named in
    ``$YOLO_CONVPLUG_MODULES`` (comma-separated) that was not imported yet; a failure warns, naming it."""
    if f"group:{GROUP}" not in _done:
        _done.add(f"group:{GROUP}")
        for ep in _entry_points():
            _load(f"ep:{ep.name}={ep.value}", f"entry point {ep.name} = {ep.value} (group {GROUP})", ep.load)
    for name in filter(None, (n.strip() for n in os.environ.get(ENV, "").split(","))):
        _load(f"env:{name}", f"module {name!r} named in ${ENV}", lambda name=name: _import_from_cwd(name))


def _import_from_cwd(name: str) -> None:
    """Import ``name`` as ``python -m`` would find it: the working directory first, then ``sys.path`` (a console
    script such as ``yolo`` has its own folder, not the working directory, on ``sys.path``)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name.partition(".")[0]:
            raise
        raise ModuleNotFoundError(
            f"no module named {name!r} in the working directory {cwd} or on sys.path; run from the folder that holds "
            f"{name.replace('.', '/')}.py, or set PYTHONPATH to that folder"
        ) from None
    finally:
        if added:
            sys.path.remove(cwd)
