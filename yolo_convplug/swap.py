"""Swap blocks in a model YAML while keeping every layer index, and prove that the result builds.

``swap_yaml("yolov8.yaml", ["Conv=SAConv2d"], scope="strided")`` rewrites the module name of the selected rows of
``backbone + head`` and nothing else: the row count, every ``from`` index and every untouched row stay as they were,
so the state-dict keys (``model.<i>.*``) of untouched layers still match and ``pretrained=`` weight transfer keeps
working for them. A swapped row's arguments are carried over by parameter name (``Conv [64]`` with its default k=1
becomes ``SAConv2d [64, 1]``, ``C3k2 [256, False, 0.25]`` becomes ``C2f_Faster [256, True, 1, 0.25]``), which is
sound only inside a module *role* (Ultralytics' own roles are read from its parser,
:func:`yolo_convplug.integration.ultralytics_roles`):

- ``conv``: ``[c2, k, s, ...]`` rows (Ultralytics ``Conv``, ``DWConv``, ``GhostConv``; our ``SAConv2d`` ...);
- ``repeat``: C2f-like rows whose repeat count the parser inserts (``C2f``, ``C3``, ``C3k2``; our ``C2f_Faster``);
- ``keep``: modules whose output width equals their input width (registered by plug-ins with that role).

A cross-role swap (``C2f=SAConv2d``) is refused with the layer it would break; every other swap is verified by
building the model as Ultralytics does (:mod:`yolo_convplug.swap_verify`; its model class for the head:
``WorldModel`` for YOLO-World, ...), running the model's own forward and comparing every layer's output shape with
the source model's; a failure names the layer.
YOLO11-style heads: Ultralytics switches the Detect head to ``legacy=False`` when C3k2/A2C2f/C2fCIB is present, so a
swap that removes all of them writes the top-level key ``legacy: false`` to keep the head unchanged.
"""

from __future__ import annotations

import copy
import inspect
import re
from pathlib import Path

import torch
import yaml

from .integration import non_legacy_modules, ultralytics_roles
from .model_yaml import row_error, rows
from .plugins import load_user_modules
from .registry import registered, yaml_parameters
from .resolve import shipped_yaml
from .swap_verify import SwapError, verify

SCOPES = ("all", "backbone", "head", "strided")
def _catalogue() -> dict[str, tuple[type | None, str]]:
    """Module name -> (class, role) for Ultralytics' own role-known modules and every registered plug-in (users'
    entry points and ``$YOLO_CONVPLUG_MODULES`` included: the parser has not necessarily loaded them yet)."""
    from ultralytics.nn import tasks

    load_user_modules()

    return {
        **{name: (getattr(tasks, name, None), role) for name, role in ultralytics_roles().items()},
        **{name: (e.cls, e.role) for name, e in registered().items()},
    }


def _known(name: str) -> bool:
    """Whether Ultralytics' (patched) parser can resolve module ``name``."""
    import torchvision
    from ultralytics.nn import tasks

    if name.startswith("nn."):
        return hasattr(torch.nn, name[3:])
    if name.startswith("torchvision.ops."):
        return hasattr(torchvision.ops, name[16:])
    return name in registered() or isinstance(getattr(tasks, name, None), type)


def _yaml_params(cls: type, role: str) -> list[inspect.Parameter] | None:
    """``yaml_parameters`` of ``cls``, or None when it takes ``*args``/``**kwargs`` (no names to match by)."""
    params = yaml_parameters(cls, role)
    if params is None or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    return params


def rewrite_args(i: int, row: list, new: str, catalogue: dict) -> tuple[list, list[str]]:
    """Arguments for ``new`` that mean what ``row``'s arguments meant for its module, matched by parameter name.

    ``Conv [64]`` (k defaults to 1) becomes ``SAConv2d [64, 1]`` rather than silently taking SAConv2d's k=3;
    ``C3k2 [256, False, 0.25]`` becomes ``C2f_Faster [256, True, 1, 0.25]`` (C3k2's shortcut=True made explicit).
    Source parameters the target lacks are dropped and returned as notes, except a stride != 1 (refused: it would
    change the feature-map geometry). Falls back to the args unchanged when a signature cannot be read.
    """
    (old_cls, role), (new_cls, _) = catalogue[row[2]], catalogue[new]
    src = _yaml_params(old_cls, role) if old_cls else None
    dst = _yaml_params(new_cls, role) if new_cls else None
    args = list(row[3])
    if src is None or dst is None or len(args) > len(src):
        return args, []
    given = {p.name: a for p, a in zip(src, args)}
    value = {**{p.name: p.default for p in src if p.default is not p.empty}, **given}
    out = []
    for p in dst:
        if p.name in value:
            out.append(value[p.name])
        elif p.default is not p.empty:
            out.append(p.default)
        else:
            raise row_error(i, row, f"{new} needs argument {p.name!r}, which {row[2]} rows lack", SwapError)
    while (
        out and dst[len(out) - 1].default is not dst[len(out) - 1].empty and _same(out[-1], dst[len(out) - 1].default)
    ):
        out.pop()  # trailing target defaults
    names = {p.name for p in dst}
    dropped = [f"{k}={v!r}" for k, v in given.items() if k not in names]
    if "s" in given and "s" not in names and str(given["s"]) != "1":
        raise row_error(
            i,
            row,
            f"{new} has no stride argument, so stride {given['s']} would be lost and the feature-map sizes would "
            "change; swap only stride-1 rows (e.g. a scope of layer indices)",
            SwapError,
        )
    return out, dropped


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b


def load_model_yaml(source: str | Path | dict) -> tuple[dict, str]:
    """Load a model YAML (a file, an Ultralytics built-in such as ``yolo11n.yaml``, a shipped name such as
    ``yolov8n-saconv.yaml``, or a dict); return (dict, scale).

    Files and names are located with Ultralytics' own ``yaml_model_load``, including its scale rule
    (``yolov8n.yaml`` reads ``yolov8.yaml`` at scale ``n``). The returned dict has no ``scale``/``yaml_file`` keys.
    """
    if isinstance(source, dict):
        d = copy.deepcopy(source)
    else:
        from ultralytics.nn.tasks import yaml_model_load

        try:
            d = yaml_model_load(source)
        except FileNotFoundError:
            raise SwapError(
                f"model YAML {str(source)!r} not found: no such file here, and no Ultralytics or yolo-convplug model "
                "of that name (e.g. yolov8.yaml, yolo11n.yaml, yolo26s.yaml, yolov8n-saconv.yaml)"
            ) from None
    scale = d.pop("scale", "") or ""
    d.pop("yaml_file", None)
    for key in ("backbone", "head"):
        if not isinstance(d.get(key), list):
            raise SwapError(f"model YAML {source!r} has no '{key}' list; is it a model YAML (not a data YAML)?")
    return d, scale


def parse_rules(rules: str | list[str] | dict[str, str]) -> dict[str, str]:
    """``"Conv=SAConv2d,C2f=C2f_Faster"`` or ``["Conv=SAConv2d"]`` or a dict -> ``{"Conv": "SAConv2d", ...}``;
    two different targets for one source module are refused."""
    if isinstance(rules, dict):
        return dict(rules)
    items = [r for part in ([rules] if isinstance(rules, str) else rules) for r in str(part).split(",") if r.strip()]
    out = {}
    for item in items:
        old, sep, new = (s.strip() for s in item.partition("="))
        if not (sep and old and new):
            raise SwapError(f"swap rule {item!r} is not OLD=NEW, e.g. 'Conv=SAConv2d' or 'C2f=C2f_Faster'")
        if out.get(old, new) != new:
            raise SwapError(
                f"two rules for {old} ({old}={out[old]} and {old}={new}): give one target per module; to put "
                f"different modules in different layers, run one swap per scope (e.g. --scope backbone, then head)"
            )
        out[old] = new
    if not out:
        raise SwapError("no swap rule given; pass rules such as 'Conv=SAConv2d'")
    return out


def select_rows(d: dict, scope: str | list[int] = "all") -> list[int]:
    """Layer indices in scope: ``all``, ``backbone``, ``head``, ``strided`` (conv-role rows with a stride argument
    > 1), or indices such as ``"1,3,5"``, ``"0-4,9"`` or a list of ints."""
    layers = rows(d)
    nb = len(d["backbone"])
    if isinstance(scope, str) and scope in SCOPES:
        if scope == "strided":
            catalogue = _catalogue()
            return [i for i, r in enumerate(layers) if _stride(r, *catalogue.get(r[2], (None, None))) > 1]
        return {"all": list(range(len(layers))), "backbone": list(range(nb)), "head": list(range(nb, len(layers)))}[
            scope
        ]
    if isinstance(scope, str):
        out = []
        for part in filter(None, (p.strip() for p in scope.split(","))):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise SwapError(f"scope {scope!r}: use one of {', '.join(SCOPES)} or indices such as '1,3,5' or '0-4'")
            lo, hi = int(m[1]), int(m[2] or m[1])
            out.extend(range(lo, hi + 1))
        scope = out
    bad = [i for i in scope if not 0 <= int(i) < len(layers)]
    if bad or not scope:
        raise SwapError(
            f"scope {scope!r}: layer indices must lie in 0..{len(layers) - 1} (this YAML has {len(layers)} rows)"
        )
    return sorted({int(i) for i in scope})


def _stride(row: list, cls: type | None, role: str | None) -> int:
    """The stride argument ``s`` of a conv-role row (1 when the module has none or the row leaves it out)."""
    params = _yaml_params(cls, role) if cls is not None and role == "conv" else None
    names = [p.name for p in params or ()]
    if "s" not in names or len(row[3]) <= names.index("s"):
        return 1
    try:
        return int(row[3][names.index("s")])
    except (TypeError, ValueError):
        return 1


def swap_dict(d: dict, rules, scope="all") -> tuple[dict, list[tuple[int, str, str, list[str]]]]:
    """Apply ``rules`` to the rows in ``scope`` of model dict ``d``; return (new dict, changes).

    ``changes`` lists ``(index, old module, new module, dropped arguments)``; arguments are carried over by name
    (see ``rewrite_args``).

    Raises SwapError for unknown target modules, cross-role swaps (naming the layer) and rules that match nothing.
    """
    rules, catalogue = parse_rules(rules), _catalogue()
    roles = {name: role for name, (_, role) in catalogue.items()}
    out = copy.deepcopy(d)
    layers = rows(out)  # same row objects as in out: editing a row edits out
    for new in rules.values():
        if not _known(new):
            plugins = ", ".join(sorted(registered())) or "none registered"
            raise SwapError(
                f"unknown module {new!r}: not an Ultralytics module and not a registered plug-in "
                f"(plug-ins: {plugins}); register your own with @yolo_convplug.register(role=...)"
            )
    changed = []
    for i in select_rows(out, scope):
        old = layers[i][2]
        if old not in rules:
            continue
        new = rules[old]
        r_old, r_new = roles.get(old), roles.get(new)
        if r_old and r_new and r_old != r_new:
            same_role = ", ".join(sorted(n for n, r in roles.items() if r == r_old)[:6])
            raise row_error(
                i,
                layers[i],
                f"cannot swap {old} ({r_old} role) for {new} ({r_new} role); the row's arguments only fit "
                f"{r_old}-role modules (e.g. {same_role})",
                SwapError,
            )
        layers[i][3], dropped = rewrite_args(i, layers[i], new, catalogue) if r_old and r_new else (layers[i][3], [])
        layers[i][2] = new
        changed.append((i, old, new, dropped))
    present = {r[2] for r in rows(d)}
    absent = [old for old in rules if old not in present]
    if absent or not changed:
        raise SwapError(
            f"rule(s) {', '.join(f'{o}={rules[o]}' for o in absent or rules)} matched no layer"
            f"{'' if absent else f' in scope {scope!r}'}; modules in this YAML: {', '.join(sorted(present))}"
        )
    non_legacy = non_legacy_modules()
    if present & non_legacy and not ({r[2] for r in layers} & non_legacy) and "legacy" not in out:
        out["legacy"] = False  # keep the non-legacy Detect head that the source's C3k2/A2C2f/C2fCIB selected
    return out, changed


def _verify_skipping(new: dict, original: dict, changed: list, scale: str) -> tuple[str | None, list]:
    """``verify`` for a named scope (``all``, ``backbone``, ...): a swapped layer whose module refuses the row with its
    own argument check (a ``ValueError``, e.g. a module that needs more input channels than layer 0's 3) is put back
    to the original module and reported instead of failing the swap. Edits ``new`` and ``changed`` in place; returns
    (``verify``'s result, [(layer, module, reason)])."""
    skipped = []
    while True:
        try:
            return verify(new, scale, original=original), skipped
        except SwapError as e:
            cause = e.__cause__
            i = getattr(cause, "layer", None)
            swapped = {c[0]: c for c in changed}
            if not (isinstance(getattr(cause, "original", None), ValueError) and i in swapped):
                raise
            rows(new)[i][:] = copy.deepcopy(rows(original)[i])
            changed.remove(swapped[i])
            skipped.append((i, swapped[i][2], str(cause.original)))
            if not changed:
                raise SwapError(f"no layer in scope can take the swap: {'; '.join(str(s) for s in skipped)}") from e


def dump_model_yaml(d: dict, header: str = "") -> str:
    """Model dict -> YAML text in Ultralytics' layout: one flow-style row per layer, annotated with its index."""
    text = "".join(f"# {line}\n" for line in header.splitlines())
    for key, value in d.items():
        if key in ("backbone", "head"):
            continue
        if isinstance(value, dict):  # e.g. scales: one flow-style line per entry
            text += f"{key}:\n" + "".join(f"  {k}: {_flow(v)}\n" for k, v in value.items())
        else:
            text += f"{key}: {_flow(value)}\n"
    i = 0
    for key in ("backbone", "head"):
        text += f"\n{key}:\n"
        for row in d[key]:
            text += f"  - {_flow(row)} # {i}\n"
            i += 1
    return text


def _flow(value) -> str:
    """One-line YAML for a scalar or a (nested) list/dict."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).split("\n")[0]


def scaled_name(stem: str, scale: str) -> str | None:
    """``stem`` carrying ``scale`` the way Ultralytics reads it back (``yolov8`` + ``s`` -> ``yolov8s``; a stem that
    has a scale keeps it), or None when the stem is not of Ultralytics' ``yolo<version>`` form."""
    from ultralytics.nn.tasks import guess_model_scale

    if guess_model_scale(f"{stem}.yaml"):
        return stem
    named, count = re.subn(r"^(yolo(?:e-)?v?\d+)", rf"\g<1>{scale}", stem, count=1)
    return named if count and guess_model_scale(f"{named}.yaml") == scale else None


def shadowed_yaml(path: str | Path) -> Path | None:
    """The shipped model YAML that a file at ``path`` would hide when its name is used from that folder (a local file
    wins over ours: ``yolov8n-scconv.yaml`` there builds instead of the shipped ``yolov8-scconv.yaml``), else None."""
    name = Path(path).name
    unscaled = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", name)  # Ultralytics' own rule in yaml_model_load
    return shipped_yaml(name) or shipped_yaml(unscaled)


def default_output(source, rules, scale: str) -> Path:
    """``<source stem with scale>-<targets>.yaml`` in the current folder, e.g. ``yolo26n-saconv2d.yaml``; ending in
    ``-swap.yaml`` where that name would hide a shipped YAML (see :func:`shadowed_yaml`)."""
    stem = Path(str(source)).stem if not isinstance(source, dict) else "model"
    targets = "-".join(dict.fromkeys(new.lower() for new in parse_rules(rules).values()))
    out = Path(f"{scaled_name(stem, scale) or stem}-{targets}.yaml")
    return out.with_name(f"{out.stem}-swap.yaml") if shadowed_yaml(out) else out


def swap_yaml(source, rules, scope="all", out=None, scale=None, check=True):
    """Swap modules of ``source`` per ``rules`` inside ``scope``; verify the result builds; return dict or path.

    Args:
        source (str | Path | dict): model YAML file, Ultralytics built-in name (``yolov8.yaml``, ``yolo11n.yaml``)
            or model dict.
        rules (str | list[str] | dict): ``"Conv=SAConv2d"``, ``["Conv=SAConv2d", "C2f=C2f_Faster"]`` or a dict.
        scope (str | list[int]): ``all``, ``backbone``, ``head``, ``strided`` or layer indices (``"1,3,5"``, ``"0-4"``).
        out (str | Path, optional): where to write the YAML. Name it with a scale letter (``yolov8n-x.yaml``) to pick
            a scale the way Ultralytics does; without one Ultralytics warns and uses the first scale.
        scale (str, optional): scale to verify at; default the source's scale, else the YAML's first scale.
        check (bool): build the swapped model as Ultralytics does, run it and compare every layer's output shape
            with the source model's; raise SwapError naming the failing layer. When the source model itself cannot
            run here (the check has nothing to compare with), the swap is written with an "unverified" note.

    Returns:
        (dict | Path): the swapped model dict when ``out`` is None, else the written path.
    """
    d, src_scale = load_model_yaml(source)
    new, changed = swap_dict(d, rules, scope)
    skipped = []
    if not check:
        unverified = "not checked (check=False)"
    elif isinstance(scope, str) and scope in SCOPES:
        unverified, skipped = _verify_skipping(new, d, changed, scale or src_scale)
    else:
        unverified = verify(new, scale or src_scale, original=d)
    if skipped:
        from ultralytics.utils import LOGGER

        for i, module, why in skipped:
            LOGGER.warning(f"yolo-convplug swap: layer {i} kept {rows(d)[i][2]}: {module} cannot serve it ({why})")
    if unverified and check:
        from ultralytics.utils import LOGGER

        LOGGER.warning(f"yolo-convplug swap: written but NOT verified: {unverified}")
    if out is None:
        return new
    name = source if not isinstance(source, dict) else "a model dict"
    header = (
        f"Generated by yolo-convplug swap from {name}: {', '.join(f'{a}={b}' for a, b in parse_rules(rules).items())} "
        f"(scope {scope}).\nLayer indices are unchanged; swapped layers: "
        f"{', '.join(f'{i} {a}->{b}' for i, a, b, _ in changed)}."
    )
    header += "".join(f"\nlayer {i} skipped: {m} cannot serve it ({why})" for i, m, why in skipped)
    header += "".join(f"\nlayer {i} dropped {', '.join(x)} ({b} has no such argument)" for i, _, b, x in changed if x)
    if unverified:
        header += f"\nNot verified: {unverified}"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump_model_yaml(new, header))
    return out
