"""Datasets for the research workflow: which data a run uses, and the synthetic ``shapes`` set.

``resolve_data(data)`` picks the dataset of a train/val/ablation run:

1. an explicit ``data`` argument (a data YAML, an Ultralytics name such as ``coco8.yaml``, or ``shapes``);
2. else the local COCO128 named by ``$CONVPLUG_COCO128`` (path to its ``coco128.yaml``);
3. else Ultralytics' ``coco128.yaml``, which Ultralytics downloads on first use; offline and without a local copy
   it prints why and falls back to ``shapes``.

``shapes`` is a detection set generated deterministically (seeded NumPy, PNG via OpenCV) into a cache folder: filled
circles, rectangles, triangles and crosses in random colours on textured backgrounds (gradients, stripes, checkers,
smoothed noise), with validation images separate from the training images. A YOLOv8n learns it from scratch on a CPU
in minutes, which makes it the offline default and the learnability benchmark of the ablation. Spell it ``shapes`` or
with options, ``shapes:train=16,val=8,imgsz=64,seed=0``.

``same_images(data)`` tells whether a data YAML validates on (some of) its training images, as COCO128 does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

COCO128 = "coco128.yaml"
ENV_COCO128 = "CONVPLUG_COCO128"
ENV_CACHE = "CONVPLUG_CACHE"
SHAPES_VERSION = 1  # bump when the generator changes so that old caches are not reused
CLASSES = ("circle", "rectangle", "triangle", "cross")
_MARKER = ".complete"


@dataclass(frozen=True)
class ShapesSpec:
    """Parameters of a ``shapes`` set; the cache folder name encodes all of them."""

    train: int = 256
    val: int = 64
    imgsz: int = 160
    seed: int = 0

    @classmethod
    def parse(cls, spec: str) -> ShapesSpec:
        """Parse ``shapes`` or ``shapes:train=16,val=8,imgsz=64,seed=0`` (any subset of the keys)."""
        name, _, opts = spec.partition(":")
        if name != "shapes":
            raise ValueError(f"data={spec!r} is not a shapes spec; use 'shapes' or 'shapes:train=16,val=8,imgsz=64'")
        kw = {}
        for item in filter(None, opts.split(",")):
            key, _, value = item.partition("=")
            if key not in cls.__dataclass_fields__ or not value.strip().isdigit():
                raise ValueError(
                    f"data={spec!r}: bad option {item!r}; options are train, val, imgsz, seed with integer values, "
                    "e.g. 'shapes:train=16,val=8,imgsz=64'"
                )
            kw[key] = int(value)
        out = cls(**kw)
        if out.train < 1 or out.val < 1 or out.imgsz < 32:
            raise ValueError(f"data={spec!r}: need train >= 1, val >= 1 and imgsz >= 32")
        return out

    @property
    def folder(self) -> str:
        return f"shapes-v{SHAPES_VERSION}-t{self.train}-v{self.val}-s{self.imgsz}-r{self.seed}"


def cache_dir() -> Path:
    """Root of generated data: ``$CONVPLUG_CACHE`` or ``~/.cache/yolo_convplug``."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "yolo_convplug").expanduser()


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured BGR uint8 background: gradient, stripes, checkers or smoothed noise, plus pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    kind = rng.integers(4)
    if kind == 0:  # linear gradient in a random direction
        a = rng.uniform(0, 2 * np.pi)
        t = np.cos(a) * xx + np.sin(a) * yy
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
    elif kind == 1:  # sinusoidal stripes
        a, f = rng.uniform(0, np.pi), rng.uniform(2, 10)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * f * (np.cos(a) * xx + np.sin(a) * yy) + rng.uniform(0, 2 * np.pi))
    elif kind == 2:  # checkers
        f = rng.integers(3, 9)
        t = ((np.floor(xx * f) + np.floor(yy * f)) % 2).astype(np.float32)
    else:  # low-frequency noise
        g = rng.uniform(0, 1, (8, 8)).astype(np.float32)
        t = cv2.resize(g, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    img = c0 + (c1 - c0) * t[..., None] * rng.uniform(0.3, 0.8)  # muted texture so that shapes stand out
    img += rng.normal(0, 8, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def _draw(img: np.ndarray, cls: int, cx: float, cy: float, r: float, angle: float, colour: tuple) -> None:
    """Draw filled shape ``cls`` of radius ``r`` centred at (cx, cy), rotated by ``angle`` (radians)."""
    if cls == 0:
        cv2.circle(img, (round(cx), round(cy)), round(r), colour, -1, cv2.LINE_AA)
        return
    if cls == 1:  # rectangle with aspect ratio in [0.5, 1]
        corners = np.array([[1, 0.6], [-1, 0.6], [-1, -0.6], [1, -0.6]])
    elif cls == 2:  # equilateral triangle
        corners = np.array([[np.cos(t), np.sin(t)] for t in (np.pi / 2 + 2 * np.pi * k / 3 for k in range(3))])
    else:  # plus-shaped cross, arm width 0.6
        w = 0.3
        corners = np.array([[w, 1], [-w, 1], [-w, w], [-1, w], [-1, -w], [-w, -w], [-w, -1], [w, -1], [w, -w],
                            [1, -w], [1, w], [w, w]])  # fmt: skip
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = (corners @ rot.T) * r + (cx, cy)
    cv2.fillPoly(img, [np.round(pts).astype(np.int32)], colour, cv2.LINE_AA)


def _sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[str]]:
    """One image and its YOLO label lines; objects do not overlap so that every box is the tight box of its shape."""
    img = _background(rng, size)
    placed, lines = [], []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):  # rejection sampling of a free spot
            r = rng.uniform(0.1, 0.22) * size
            cx, cy = rng.uniform(r, size - r, 2)
            if all(np.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in placed):
                break
        else:
            continue
        cls = int(rng.integers(len(CLASSES)))
        angle = rng.uniform(0, 2 * np.pi)
        y0, y1, x0, x1 = (int(np.clip(v, 0, size)) for v in (cy - r, cy + r + 1, cx - r, cx + r + 1))
        local = img[y0:y1, x0:x1].reshape(-1, 3).mean(0)
        colour = rng.uniform(0, 255, 3)
        while np.abs(colour - local).sum() < 180:  # keep contrast against the local background
            colour = rng.uniform(0, 255, 3)
        mask = np.zeros((size, size), np.uint8)
        _draw(mask, cls, cx, cy, r, angle, 255)
        _draw(img, cls, cx, cy, r, angle, tuple(float(c) for c in colour))
        ys, xs = np.nonzero(mask)
        bx0, bx1, by0, by1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        placed.append((cx, cy, r))
        lines.append(
            f"{cls} {(bx0 + bx1) / 2 / size:.6f} {(by0 + by1) / 2 / size:.6f} "
            f"{(bx1 - bx0) / size:.6f} {(by1 - by0) / size:.6f}"
        )
    return img, lines


def make_shapes(spec: ShapesSpec | str = ShapesSpec(), root: str | Path | None = None) -> Path:
    """Generate (or reuse) a ``shapes`` set under ``root`` (default ``cache_dir()``); return its data YAML path.

    Every image comes from its own generator seeded by (seed, split, index), so that the output is byte-identical
    across runs and machines with the same OpenCV. A marker file written last makes an interrupted generation restart.
    """
    spec = ShapesSpec.parse(spec) if isinstance(spec, str) else spec
    folder = Path(root or cache_dir()).expanduser().resolve() / spec.folder
    yaml_path = folder / "data.yaml"
    if (folder / _MARKER).exists():
        return yaml_path
    for split_id, (split, n) in enumerate((("train", spec.train), ("val", spec.val))):
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        (folder / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, lines = _sample(np.random.default_rng([spec.seed, split_id, i]), spec.imgsz)
            cv2.imwrite(str(folder / "images" / split / f"{i:05d}.png"), img)
            (folder / "labels" / split / f"{i:05d}.txt").write_text("".join(f"{x}\n" for x in lines))
    names = "".join(f"  {i}: {n}\n" for i, n in enumerate(CLASSES))
    yaml_path.write_text(
        f"# yolo-convplug synthetic shapes set ({spec})\n"
        f"path: {folder}\ntrain: images/train\nval: images/val\nnames:\n{names}"
    )
    (folder / _MARKER).write_text("ok\n")
    return yaml_path


def is_online() -> bool:
    """Whether downloads can work: Ultralytics' own quick DNS check (honours ``YOLO_OFFLINE``)."""
    from ultralytics.utils import is_online as ultralytics_is_online

    return ultralytics_is_online()


def _local_coco128() -> Path | None:
    """COCO128 already on disk in Ultralytics' datasets folder, if any."""
    from ultralytics.utils import SETTINGS

    folder = Path(SETTINGS["datasets_dir"]) / "coco128"
    return folder if (folder / "images" / "train2017").is_dir() else None


def resolve_data(data: str | Path | None = None, verbose: bool = True) -> str:
    """Return the data argument for Ultralytics: explicit > ``$CONVPLUG_COCO128`` > ``coco128.yaml`` > ``shapes``.

    ``shapes`` specs are generated (or reused) and replaced by their data YAML path. Offline without a local COCO128,
    the default falls back to ``shapes`` with a message saying why and how to point at a local copy.
    """
    if data is None or str(data) == "":
        env = os.environ.get(ENV_COCO128, "").strip()
        if env:
            if not Path(env).expanduser().is_file():
                raise FileNotFoundError(f"${ENV_COCO128}={env!r} is not a file; point it at a local coco128.yaml")
            return str(Path(env).expanduser().resolve())
        if _local_coco128() or is_online():
            return COCO128
        if verbose:
            print(
                f"yolo-convplug: offline and no local COCO128 (set ${ENV_COCO128} to a coco128.yaml to use one); "
                "falling back to the synthetic dataset data=shapes."
            )
        data = "shapes"
    data = str(data)
    if data == "shapes" or data.startswith("shapes:"):
        return str(make_shapes(data))
    return data


def split_paths(data: str | Path) -> dict[str, set[Path]]:
    """The resolved ``train`` and ``val`` entries of a data YAML, by Ultralytics' rules: relative to its ``path:``
    (else to the YAML's folder; a relative ``path:`` that does not exist is taken under Ultralytics' datasets
    folder)."""
    from ultralytics.utils import SETTINGS
    from ultralytics.utils.checks import check_yaml

    file = Path(check_yaml(str(data)))
    d = yaml.safe_load(file.read_text()) or {}
    root = Path(d.get("path") or file.parent)
    if not root.exists() and not root.is_absolute():
        root = (Path(SETTINGS["datasets_dir"]) / root).resolve()

    def resolve(entry: str) -> Path:
        x = (root / entry).resolve()
        return (root / entry[3:]).resolve() if not x.exists() and entry.startswith("../") else x

    out = {}
    for split in ("train", "val"):
        entries = d.get(split) or []
        out[split] = {resolve(e) for e in ([entries] if isinstance(entries, str) else entries)}
    return out


def same_images(data: str | Path) -> bool | None:
    """Whether the data YAML validates on an entry (folder or list file) it also trains on, as COCO128 does
    (``val: images/train2017``); None when the YAML cannot be found or read."""
    try:
        paths = split_paths(data)
    except (OSError, yaml.YAMLError, TypeError, AttributeError):
        return None
    return bool(paths["train"] & paths["val"])
