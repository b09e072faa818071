"""What this package knows about Ultralytics releases, in one place: the supported range (``pyproject.toml``'s
dependency must say the same; a test checks it), version parsing, the model families a release can build, the model
classes that Ultralytics picks by head or task, and the functions it renamed between releases. What the installed
parser itself says (its module roles, the modules that select the modern Detect head) is read from its source by the
patch that extends it, :func:`yolo_convplug.integration.ultralytics_roles` and
:func:`~yolo_convplug.integration.non_legacy_modules`."""

from __future__ import annotations

import re

SUPPORTED_RANGE = ">=8.3.0,<8.5"
MINIMUM, BELOW = (8, 3, 0), (8, 5)  # the range above as tuples: MINIMUM <= version < BELOW (compared on major.minor)
FAMILY_MINIMUM = {"yolo26": (8, 4)}  # model families that older supported releases cannot build

# Heads that Ultralytics builds with a model class of their own (it picks them by file name: "-world", "yoloe", ...)
HEAD_MODELS = {
    "WorldDetect": "WorldModel",
    "YOLOEDetect": "YOLOEModel",
    "YOLOESegment": "YOLOESegModel",
    "YOLOESegment26": "YOLOESegModel",
    "RTDETRDecoder": "RTDETRDetectionModel",
}
# The model class of each task other than detect (DetectionModel), as tasks.guess_model_task names them
TASK_MODELS = {
    "classify": "ClassificationModel",
    "segment": "SegmentationModel",
    "pose": "PoseModel",
    "obb": "OBBModel",
    "semantic": "SemanticSegmentationModel",
    "depth": "DepthModel",
}


def parse_version(ver: str) -> tuple[int, ...]:
    """``"8.4.190"`` -> ``(8, 4, 190)``; a suffix such as ``rc1`` or ``.dev0`` ends the numeric part."""
    return tuple(int(p) for p in re.findall(r"\d+", re.match(r"[\d.]*", ver).group(0)))


def installed_version() -> str:
    """The installed Ultralytics' version, read from its distribution metadata (imports nothing)."""
    from importlib.metadata import version

    return version("ultralytics")


def in_supported_range(ver: str) -> bool:
    v = parse_version(ver)
    return MINIMUM <= v and v[:2] < BELOW


def load_checkpoint(weights):
    """``(model, checkpoint)`` of a .pt file by Ultralytics' own loader: ``load_checkpoint`` (8.4) or its 8.3 name
    ``attempt_load_one_weight``."""
    from ultralytics.nn import tasks

    return (getattr(tasks, "load_checkpoint", None) or tasks.attempt_load_one_weight)(weights)


def unwrap_model(model):
    """A model without its DDP/compile wrappers: Ultralytics' ``unwrap_model`` (8.4) or its 8.3.0 name
    ``de_parallel``."""
    from ultralytics.utils import torch_utils

    return (getattr(torch_utils, "unwrap_model", None) or torch_utils.de_parallel)(model)


def family_minimum(yaml_name: str) -> tuple[int, ...] | None:
    """The oldest release that builds the family of model YAML ``yaml_name`` (``yolo26n-saconv.yaml`` -> (8, 4)),
    else None (no minimum beyond the supported range)."""
    stem = re.split(r"[\\/]", str(yaml_name))[-1].lower()
    return next((v for fam, v in FAMILY_MINIMUM.items() if re.match(rf"{fam}[nslmx]?(-|\.|$)", stem)), None)
