"""Which models an ablation compares, and how their short names resolve.

The variants of a family are the model YAMLs shipped in the package, ``yolo_convplug/cfg/models/<family>-<slug>.yaml``
(``yolov8-saconv.yaml``: family ``yolov8``, slug ``saconv``), so a new module's YAML joins the ablation with no code
edit. Names resolve from the installed package, not from a checkout:

- ``baseline`` -> Ultralytics' ``<family><scale>.yaml`` (``yolov8n.yaml``);
- a slug (``saconv``, ``c2f-faster``) -> ``cfg/models/<family><scale>-<slug>.yaml``;
- a scaled file name of one of our YAMLs (``yolo11s-condconv.yaml``, no folder) -> the same file at that scale;
- a YAML path -> made absolute; another file name (``yolo11n.yaml``, a checkpoint) goes to Ultralytics unchanged;
- any other word is an error that lists the family's slugs.

The scaled path need not exist: Ultralytics takes the scale letter from the file name and loads the unscaled YAML
next to it (``yolov8n-saconv.yaml`` -> ``yolov8-saconv.yaml``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..resolve import CFG_MODELS

DEFAULT_FAMILY = "yolov8"
CONTROL = "control"  # the slug of the control variant (yolov8-control.yaml: ConvControl, an exact stock Conv)
SCALES = "nsmlx"
_SCALED = re.compile(rf"(?P<family>.+?)(?P<scale>[{SCALES}])-(?P<slug>.+)\.ya?ml")


@dataclass(frozen=True)
class Variant:
    """A model to train: ``name`` labels it in tables, ``model`` is what ``YOLO(model)`` receives."""

    name: str
    model: str


def families() -> list[str]:
    """The families that have shipped variants (``yolov8``, ``yolo11``, ...)."""
    return sorted({p.stem.partition("-")[0] for p in CFG_MODELS.glob("*-*.yaml")})


def slugs(family: str = DEFAULT_FAMILY) -> list[str]:
    """The slugs of ``cfg/models/<family>-<slug>.yaml``, sorted."""
    return sorted(p.stem[len(family) + 1 :] for p in CFG_MODELS.glob(f"{family}-*.yaml"))


def default_variants(family: str = DEFAULT_FAMILY, control: bool = False) -> list[str]:
    """``baseline`` followed by every shipped slug of ``family``; the ``control`` slug (a plug-in that computes the
    stock layer) only with ``control=True``: it measures the fine-tuning protocol's own bias, and from scratch it
    would train the baseline again."""
    found = slugs(family)
    if not found:
        raise ValueError(
            f"family={family!r} has no model YAMLs in {CFG_MODELS}; families with variants: {', '.join(families())}"
        )
    return ["baseline", *(s for s in found if control or s != CONTROL)]


def _ours(family: str, scale: str, slug: str) -> Variant:
    name = f"{family}{scale}-{slug}"
    return Variant(name, str(CFG_MODELS / f"{name}.yaml"))


def resolve_variant(spec: str, family: str = DEFAULT_FAMILY, scale: str = "n") -> Variant:
    """Turn a variant spec into a :class:`Variant` (see the module docstring for the forms it accepts)."""
    if scale not in SCALES or len(scale) != 1:
        raise ValueError(f"scale={scale!r} is not a scale letter; use one of {', '.join(SCALES)}")
    if spec == "baseline":
        return Variant(f"{family}{scale}", f"{family}{scale}.yaml")
    if (CFG_MODELS / f"{family}-{spec}.yaml").is_file():
        return _ours(family, scale, spec)
    p = Path(spec).expanduser()
    m = _SCALED.fullmatch(spec)
    if m and p.parent == Path(".") and not p.is_file() and (CFG_MODELS / f"{m['family']}-{m['slug']}.yaml").is_file():
        return _ours(m["family"], m["scale"], m["slug"])
    if p.suffix in (".yaml", ".yml") and (p.is_file() or p.parent != Path(".")):
        # a file, or a scaled name such as path/to/yolov8n-x.yaml whose unscaled file exists next to it
        return Variant(p.stem, str(p.resolve()))
    if not p.suffix:
        raise ValueError(
            f"variant {spec!r} is not 'baseline', a {family} slug ({', '.join(slugs(family)) or 'none shipped'}), a "
            "model YAML or a checkpoint; other families: --family " + " | ".join(families())
        )
    return Variant(p.stem, spec)


def short_label(name: str, baseline: str) -> str:
    """``yolov8n-saconv`` -> ``saconv`` when the baseline is ``yolov8n``; other names unchanged."""
    return name[len(baseline) + 1 :] if name.startswith(f"{baseline}-") else name
