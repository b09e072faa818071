"""Planning an ablation: the shared training settings, the jobs (variant x seed), and which of them a previous call
already finished.

A job's run folder is ``<out>/runs/<variant>/seed<k>/``. ``done.json``, written last by the run, holds its row and
its settings key (data, train arguments, the content of the pretrained weights and of the model's YAML); a later
call reuses the row when the key is unchanged and redoes the run otherwise.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .variants import Variant

# Settings shared by every run of an ablation; any of them can be overridden with key=value. They suit short runs on
# the shapes set: AdamW at lr0=0.003 decaying to lrf=0.2 of it, one warm-up epoch, and, unless given, nbs
# (Ultralytics' nominal batch size, default 64) set to batch so that every batch is an optimizer step (with
# Ultralytics' defaults, 256 images at batch 16 make 4 optimizer steps an epoch).
TRAIN_DEFAULTS = dict(
    epochs=20,
    imgsz=160,
    batch=16,
    optimizer="AdamW",
    lr0=0.003,
    lrf=0.2,
    warmup_epochs=1,
    deterministic=True,
    pretrained=False,
    plots=False,
    val=True,
    verbose=False,
)
# Fine-tuning (pretrained=WEIGHTS) must keep the start: the settings above (AdamW at lr0 0.003, with or without the
# warm-up) wipe much of it in the first epoch. These replace them
# when fine-tuning (any can be overridden with key=value), chosen so that the baseline's first-epoch validation stays
# within 5% of the stock model's (the README's "Two protocols" gives the measurements).
FINETUNE_DEFAULTS = dict(TRAIN_DEFAULTS, epochs=10, lr0=0.0005, lrf=1.0, warmup_epochs=0)
DEFAULT_DATA = "shapes"
# Seed spread of the default protocol (data=shapes, TRAIN_DEFAULTS, the yolov8 variants): the std of mAP50-95 over
# seeds, pooled over the baseline and every default variant (the mean of their per-variant variances), measured with
#   scratch:  python scripts/ablate.py --seeds 0 1 --out runs/ablate-scratch   (7 variants x 2 seeds: 0.092)
# The fine-tuning spread depends on the weights, so it is not stated: pass --seeds 0 1 to measure it per ablation.
SEED_SPREAD_MAP5095 = {"scratch": 0.092, "finetune": None}


@dataclass(frozen=True, eq=False)  # hashed by identity: a job is a key of the ablation's tables
class Job:
    """One training of an ablation: ``variant`` with ``seed`` into ``run_dir``; ``settings`` is its reuse key."""

    variant: Variant
    seed: int
    run_dir: Path
    settings: dict

    @property
    def label(self) -> str:
        return f"{self.variant.name} seed {self.seed}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def settings_key(variant: Variant | None, train_args: dict, data: str) -> dict:
    """What must match for a finished run to be reused: data, train arguments, the content of the pretrained weights
    and of the model's YAML."""
    out = {"data": data, **{k: v for k, v in sorted(train_args.items()) if k not in ("verbose", "workers")}}
    weights = train_args.get("pretrained")
    if isinstance(weights, str) and Path(weights).is_file():
        out["pretrained_sha256"] = sha256(Path(weights))
    if variant is not None:
        from ultralytics.nn.tasks import yaml_model_load

        cfg = json.dumps(yaml_model_load(variant.model), sort_keys=True, default=str)
        out["model"] = f"{variant.model} sha256:{hashlib.sha256(cfg.encode()).hexdigest()[:16]}"
    return out


def plan_jobs(variants: list[Variant], seeds, out: Path, train_args: dict, data: str) -> list[Job]:
    """Every variant with every seed, in table order (variant-major)."""
    keys = {v.name: settings_key(v, train_args, data) for v in variants}
    return [Job(v, s, out / "runs" / v.name / f"seed{s}", keys[v.name]) for v in variants for s in seeds]


def load_done(job: Job) -> dict | None:
    """The row of a finished run with the same settings, else None."""
    try:
        info = json.loads((job.run_dir / "done.json").read_text())
    except (OSError, ValueError):
        return None
    return info["row"] if info.get("settings") == json.loads(json.dumps(job.settings)) else None


def pretrained_arg(value) -> str | None:
    """The ``pretrained=`` train argument as weights to fine-tune from: a file (made absolute), an Ultralytics weights
    name it downloads, or None for training from scratch."""
    if value in (None, False, "", "False"):
        return None
    if value is True or not str(value).endswith(".pt"):
        raise ValueError(
            f"pretrained={value!r}: give the weights to fine-tune every variant from (a .pt file such as "
            "yolov8n.pt or runs/.../best.pt), or leave it out to train from scratch"
        )
    p = Path(str(value)).expanduser()
    return str(p.resolve()) if p.is_file() else str(value)


def protocol_defaults(finetune: bool) -> dict:
    """The settings every run shares unless overridden: :data:`FINETUNE_DEFAULTS` when fine-tuning, else
    :data:`TRAIN_DEFAULTS`."""
    return FINETUNE_DEFAULTS if finetune else TRAIN_DEFAULTS


def is_default_protocol(data_spec, train_args: dict) -> bool:
    """Whether the runs follow a protocol whose seed spread was measured: shapes and the protocol's defaults (with
    any weights, device and number of data workers)."""
    base = protocol_defaults(bool(train_args.get("pretrained")))
    defaults = {**base, "nbs": base["batch"]}
    ignore = ("pretrained", "device", "workers")
    return str(data_spec) == DEFAULT_DATA and {k: v for k, v in train_args.items() if k not in ignore} == {
        k: v for k, v in defaults.items() if k not in ignore
    }
