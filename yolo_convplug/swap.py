"""Swap blocks in a model YAML while keeping every layer index, and prove that the result builds.

``swap_yaml("yolov8.yaml", ["Conv=SAConv2d"], scope="strided")`` rewrites the module name of the selected rows of
``backbone + head`` and nothing else: the row count, every ``from`` index and every untouched row stay as they were,
so the state-dict keys (``model.<i>.*``) of untouched layers still match and ``pretrained=`` weight transfer keeps
working for them. A swapped row's arguments are carried over by parameter name (``Conv [64]`` with its default k=1
becomes ``SAConv2d [64, 1]``, ``C3k2 [256, False, 0.25]`` becomes ``C2f_Faster [256, True, 1, 0.25]``), which is
sound only inside a module *role*:

- ``conv``: ``[c2, k, s, ...]`` rows (Ultralytics ``Conv``, ``DWConv``, ``GhostConv``; our ``SAConv2d`` ...);
- ``repeat``: C2f-like rows whose repeat count the parser inserts (``C2f``, ``C3``, ``C3k2``; our ``C2f_Faster``);
- ``keep``: modules whose output width equals their input width (registered by plug-ins with that role).

A cross-role swap (``C2f=SAConv2d``) is refused with the layer it would break; every other swap is verified by
building the model with Ultralytics (and running one forward pass) and a failure names the layer, module and reason.
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

from yolo_convplug.registry import registered, yaml_parameters

SCOPES = ("all", "backbone", "head", "strided")
ULTRALYTICS_ROLES = {
    **dict.fromkeys(("Conv", "DWConv", "GhostConv"), "conv"),
    **dict.fromkeys(
        (
            "BottleneckCSP",
            "C1",
            "C2",
            "C2f",
            "C3k2",
            "C2fAttn",
            "C3",
            "C3TR",
            "C3Ghost",
            "C3x",
            "RepC3",
            "C2fPSA",
            "C2fCIB",
            "C2PSA",
            "A2C2f",
        ),
        "repeat",
    ),  # fmt: skip  (the repeat_modules of Ultralytics' parse_model)
}
NON_LEGACY = frozenset({"C3k2", "A2C2f", "C2fCIB"})  # presence makes Ultralytics build the non-legacy Detect head


class SwapError(ValueError):
    """A swap that cannot build; the message names the layer index, the module and why."""


def _catalogue() -> dict[str, tuple[type | None, str]]:
    """Module name -> (class, role) for Ultralytics' own role-known modules and every registered plug-in."""
    from ultralytics.nn import tasks

    return {
        **{name: (getattr(tasks, name, None), role) for name, role in ULTRALYTICS_ROLES.items()},
        **{name: (e.cls, e.role) for name, e in registered().items()},
    }


def _roles() -> dict[str, str]:
    """Module name -> role."""
    return {name: role for name, (_, role) in _catalogue().items()}


def _known(name: str) -> bool:
    """Whether Ultralytics' (patched) parser can resolve module ``name``."""
    import torchvision
    from ultralytics.nn import tasks

    if name.startswith("nn."):
        return hasattr(torch.nn, name[3:])
    if name.startswith("torchvision.ops."):
        return hasattr(torchvision.ops, name[16:])
    return name in _roles() or isinstance(getattr(tasks, name, None), type)


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
            raise SwapError(f"layer {i} ({row[2]} {row[3]}): {new} needs argument {p.name!r}, which {row[2]} rows lack")
    while (
        out and dst[len(out) - 1].default is not dst[len(out) - 1].empty and _same(out[-1], dst[len(out) - 1].default)
    ):
        out.pop()  # trailing target defaults
    names = {p.name for p in dst}
    dropped = [f"{k}={v!r}" for k, v in given.items() if k not in names]
    if "s" in given and "s" not in names and str(given["s"]) != "1":
        raise SwapError(
            f"layer {i} ({row[2]} {row[3]}): {new} has no stride argument, so stride {given['s']} would be lost "
            "and the feature-map sizes would change; swap only stride-1 rows (e.g. a scope of layer indices)"
        )
    return out, dropped


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b


def load_model_yaml(source: str | Path | dict) -> tuple[dict, str]:
    """Load a model YAML (a file, an Ultralytics built-in such as ``yolo11n.yaml``, or a dict); return (dict, scale).

    Files and built-in names are located with Ultralytics' own ``yaml_model_load``, including its scale rule
    (``yolov8n.yaml`` reads ``yolov8.yaml`` at scale ``n``). The returned dict has no ``scale``/``yaml_file`` keys.
    """
    if isinstance(source, dict):
        d = copy.deepcopy(source)
    else:
        from ultralytics.nn.tasks import yaml_model_load

        d = yaml_model_load(source)
    scale = d.pop("scale", "") or ""
    d.pop("yaml_file", None)
    for key in ("backbone", "head"):
        if not isinstance(d.get(key), list):
            raise SwapError(f"model YAML {source!r} has no '{key}' list; is it a model YAML (not a data YAML)?")
    return d, scale


def parse_rules(rules: str | list[str] | dict[str, str]) -> dict[str, str]:
    """``"Conv=SAConv2d,C2f=C2f_Faster"`` or ``["Conv=SAConv2d"]`` or a dict -> ``{"Conv": "SAConv2d", ...}``."""
    if isinstance(rules, dict):
        return dict(rules)
    items = [r for part in ([rules] if isinstance(rules, str) else rules) for r in str(part).split(",") if r.strip()]
    out = {}
    for item in items:
        old, sep, new = (s.strip() for s in item.partition("="))
        if not (sep and old and new):
            raise SwapError(f"swap rule {item!r} is not OLD=NEW, e.g. 'Conv=SAConv2d' or 'C2f=C2f_Faster'")
        out[old] = new
    if not out:
        raise SwapError("no swap rule given; pass rules such as 'Conv=SAConv2d'")
    return out


def select_rows(d: dict, scope: str | list[int] = "all") -> list[int]:
    """Layer indices in scope: ``all``, ``backbone``, ``head``, ``strided`` (conv-role rows with stride > 1), or
    indices such as ``"1,3,5"``, ``"0-4,9"`` or a list of ints."""
    rows = d["backbone"] + d["head"]
    nb = len(d["backbone"])
    if isinstance(scope, str) and scope in SCOPES:
        if scope == "strided":
            roles = _roles()
            return [i for i, r in enumerate(rows) if roles.get(r[2]) == "conv" and _stride(r) > 1]
        return {"all": list(range(len(rows))), "backbone": list(range(nb)), "head": list(range(nb, len(rows)))}[scope]
    if isinstance(scope, str):
        out = []
        for part in filter(None, (p.strip() for p in scope.split(","))):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise SwapError(f"scope {scope!r}: use one of {', '.join(SCOPES)} or indices such as '1,3,5' or '0-4'")
            lo, hi = int(m[1]), int(m[2] or m[1])
            out.extend(range(lo, hi + 1))
        scope = out
    bad = [i for i in scope if not 0 <= int(i) < len(rows)]
    if bad or not scope:
        raise SwapError(
            f"scope {scope!r}: layer indices must lie in 0..{len(rows) - 1} (this YAML has {len(rows)} rows)"
        )
    return sorted({int(i) for i in scope})


def _stride(row: list) -> int:
    """Stride of a conv-role row ``[f, n, m, [c2, k, s, ...]]`` (1 when not given)."""
    args = row[3]
    try:
        return int(args[2]) if len(args) > 2 else 1
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
    rows = out["backbone"] + out["head"]  # same row objects as in out: editing a row edits out
    for new in rules.values():
        if not _known(new):
            plugins = ", ".join(sorted(n for n in roles if n not in ULTRALYTICS_ROLES)) or "none registered"
            raise SwapError(
                f"unknown module {new!r}: not an Ultralytics module and not a registered plug-in "
                f"(plug-ins: {plugins}); did you 'import yolo_convplug'?"
            )
    changed = []
    for i in select_rows(out, scope):
        old = rows[i][2]
        if old not in rules:
            continue
        new = rules[old]
        r_old, r_new = roles.get(old), roles.get(new)
        if r_old and r_new and r_old != r_new:
            raise SwapError(
                f"layer {i} ({old} {rows[i][3]}): cannot swap {old} ({r_old} role) for {new} ({r_new} role); "
                f"the row's arguments only fit {r_old}-role modules (e.g. "
                f"{', '.join(sorted(n for n, r in roles.items() if r == r_old)[:6])})"
            )
        rows[i][3], dropped = rewrite_args(i, rows[i], new, catalogue) if r_old and r_new else (rows[i][3], [])
        rows[i][2] = new
        changed.append((i, old, new, dropped))
    present = {r[2] for r in d["backbone"] + d["head"]}
    absent = [old for old in rules if old not in present]
    if absent or not changed:
        raise SwapError(
            f"rule(s) {', '.join(f'{o}={rules[o]}' for o in absent or rules)} matched no layer"
            f"{'' if absent else f' in scope {scope!r}'}; modules in this YAML: {', '.join(sorted(present))}"
        )
    if present & NON_LEGACY and not ({r[2] for r in rows} & NON_LEGACY) and "legacy" not in out:
        out["legacy"] = False  # keep the non-legacy Detect head that the source's C3k2/A2C2f/C2fCIB selected
    return out, changed


def _with_scale(d: dict, scale: str) -> dict:
    return {**copy.deepcopy(d), "scale": scale or next(iter(d.get("scales") or {"": 0}))}


def _build_rows(d: dict, ch: int) -> torch.nn.Sequential:
    """``parse_model`` on ``d``; when it fails, rebuild growing prefixes to name the first row that does not build."""
    from ultralytics.nn import tasks

    try:
        return tasks.parse_model(copy.deepcopy(d), ch=ch, verbose=False)[0].eval()
    except Exception as error:
        rows = d["backbone"] + d["head"]
        for i in range(len(rows)):
            try:
                tasks.parse_model({**d, "backbone": copy.deepcopy(rows[: i + 1]), "head": []}, ch=ch, verbose=False)
            except Exception as e:
                raise SwapError(f"layer {i} ({rows[i][2]} {rows[i][3]}) does not build: {type(e).__name__}: {e}") from e
        raise SwapError(f"the swapped model does not build: {type(error).__name__}: {error}") from error


def _shapes(x):
    return (
        tuple(x.shape)
        if isinstance(x, torch.Tensor)
        else [_shapes(t) for t in x]
        if isinstance(x, (list, tuple))
        else None
    )


def _layer_shapes(model: torch.nn.Sequential, x: torch.Tensor):
    """Run ``model`` layer by layer (routing like ``BaseModel._predict_once``); yield (index, output shapes)."""
    y = []
    with torch.no_grad():
        for m in model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x)
            yield m.i, _shapes(x)


def verify(d: dict, scale: str = "", original: dict | None = None, ch: int = 3, imgsz: int = 64) -> None:
    """Build ``d`` with Ultralytics at ``scale``, run a forward pass and, given the ``original`` model dict, require
    every layer's output shape to match the original's. On failure raise SwapError naming the layer."""
    from ultralytics.nn import tasks

    d = _with_scale(d, scale)
    rows = d["backbone"] + d["head"]
    x = torch.zeros(1, ch, imgsz, imgsz)
    ref = dict(_layer_shapes(_build_rows(_with_scale(original, d["scale"]), ch), x)) if original else {}
    model, seen = _build_rows(d, ch), {}
    try:
        for i, shape in _layer_shapes(model, x):
            seen[i] = shape
    except Exception as e:
        i = len(seen)
        culprit = next((j for j in seen if ref and seen[j] != ref[j]), i)
        why = f"its output {seen[culprit]} differs from the original {ref[culprit]}" if culprit != i else "it fails"
        raise SwapError(
            f"layer {culprit} ({rows[culprit][2]} {rows[culprit][3]}): {why}; forward fails at layer {i} "
            f"({rows[i][2]}): {type(e).__name__}: {e}"
        ) from e
    bad = next((j for j in seen if ref and seen[j] != ref[j]), None)
    if bad is not None:
        raise SwapError(
            f"layer {bad} ({rows[bad][2]} {rows[bad][3]}): output shape {seen[bad]} differs from the original layer's "
            f"{ref[bad]}; a swap must keep every layer's output shape"
        )
    model_class = {
        "classify": tasks.ClassificationModel,
        "segment": tasks.SegmentationModel,
        "pose": tasks.PoseModel,
        "obb": tasks.OBBModel,
    }.get(tasks.guess_model_task(d), tasks.DetectionModel)
    try:
        model_class(copy.deepcopy(d), ch=ch, verbose=False)
    except Exception as e:
        raise SwapError(f"the swapped model does not build as a {model_class.__name__}: {type(e).__name__}: {e}") from e


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


def swap_yaml(source, rules, scope="all", out=None, scale=None, check=True):
    """Swap modules of ``source`` per ``rules`` inside ``scope``; verify the result builds; return dict or path.

    Args:
        source (str | Path | dict): model YAML file, Ultralytics built-in name (``yolov8.yaml``, ``yolo11n.yaml``)
            or model dict.
        rules (str | list[str] | dict): ``"Conv=SAConv2d"``, ``["Conv=SAConv2d", "C2f=C2f_Faster"]`` or a dict.
        scope (str | list[int]): ``all``, ``backbone``, ``head``, ``strided`` or layer indices (``"1,3,5"``, ``"0-4"``).
        out (str | Path, optional): where to write the YAML. Name it with a scale letter (``yolov8n-x.yaml``) to pick
            a scale the way Ultralytics does; without one Ultralytics uses the first scale.
        scale (str, optional): scale to verify at; default the source's scale, else the YAML's first scale.
        check (bool): build the swapped model with Ultralytics, run it and compare every layer's output shape with the
            source model's; raise SwapError naming the failing layer.

    Returns:
        (dict | Path): the swapped model dict when ``out`` is None, else the written path.
    """
    d, src_scale = load_model_yaml(source)
    new, changed = swap_dict(d, rules, scope)
    if check:
        verify(new, scale or src_scale, original=d)
    if out is None:
        return new
    name = source if not isinstance(source, dict) else "a model dict"
    header = (
        f"Generated by yolo-convplug swap from {name}: {', '.join(f'{a}={b}' for a, b in parse_rules(rules).items())} "
        f"(scope {scope}).\nLayer indices are unchanged; swapped layers: "
        f"{', '.join(f'{i} {a}->{b}' for i, a, b, _ in changed)}."
    )
    dropped = [f"layer {i} dropped {', '.join(x)} ({b} has no such argument)" for i, _, b, x in changed if x]
    header += "".join(f"\n{line}" for line in dropped)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump_model_yaml(new, header))
    return out
