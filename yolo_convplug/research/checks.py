"""Checks an ablation makes once, before any run trains: the train arguments (Ultralytics' own configuration
checks), the data YAML, and the weights to fine-tune from, which must load as an Ultralytics checkpoint and fit the
baseline. Each failure is one :class:`ArgumentError` naming the argument and the fix."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

# A checkpoint fits the baseline when at least this share of the baseline's tensors take its values (matching key and
# shape, as BaseModel.load transfers them): a checkpoint of the same model trained on other classes misses only the
# class head's last convolutions; one of another family or scale misses most layers.
MIN_TRANSFER = 0.9


class ArgumentError(ValueError):
    """An ablation argument that no run can use; rerunning cannot fix it."""


def _first_line(e: BaseException) -> str:
    """The exception's first line without terminal colours (Ultralytics 8.3 colours the argument's name)."""
    from ultralytics.utils import remove_colorstr

    text = remove_colorstr(str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_train_args(train_args: dict) -> None:
    """Ultralytics' own checks of key=value train arguments (names, types and ranges: ``get_cfg``/``check_cfg``)."""
    from ultralytics.cfg import get_cfg

    try:
        with contextlib.redirect_stdout(io.StringIO()), _quiet_logger():  # its help text would bury the message
            get_cfg(overrides={k: v for k, v in train_args.items() if k != "pretrained"})
    except (SyntaxError, TypeError, ValueError) as e:
        raise ArgumentError(f"train argument: {_first_line(e)}") from None


@contextlib.contextmanager
def _quiet_logger():
    from ultralytics.utils import LOGGER

    level = LOGGER.level
    LOGGER.setLevel(100)
    try:
        yield
    finally:
        LOGGER.setLevel(level)


def check_data(data: str) -> dict:
    """The parsed data YAML (Ultralytics' ``check_det_dataset`` without downloading); an error when it is missing,
    unreadable or its image folders do not exist."""
    from ultralytics.data.utils import check_det_dataset

    if str(data).endswith((".yaml", ".yml")) and "/" in str(data) and not Path(data).is_file():
        raise ArgumentError(f"data={data!r}: no such file; give a data YAML, 'shapes', or --data coco128")
    try:
        with _quiet_logger():
            return check_det_dataset(str(data), autodownload=False)
    except Exception as e:
        raise ArgumentError(f"data={data!r} is not a usable dataset: {_first_line(e)}") from None


def check_local_data(data: str) -> dict | None:
    """:func:`check_data` of a data YAML given as a file or a path; None for a bare name such as ``coco128.yaml``,
    which Ultralytics may download."""
    return check_data(data) if Path(data).is_file() or "/" in data else None


def load_weights(weights: str, arg: str = "--pretrained"):
    """The model of a checkpoint file (Ultralytics' loader), or an error naming ``arg`` and saying what the file is
    not."""
    from ..ultralytics_compat import load_checkpoint

    if not Path(weights).is_file():
        raise ArgumentError(f"{arg} {weights}: no such file; give a .pt checkpoint such as runs/.../best.pt")
    try:
        with _quiet_logger():
            model, _ = load_checkpoint(weights)
    except Exception as e:
        raise ArgumentError(
            f"{arg} {weights}: does not load as an Ultralytics checkpoint ({type(e).__name__}: "
            f"{_first_line(e)}); give a .pt file that Ultralytics saved (best.pt, last.pt, yolov8n.pt)"
        ) from None
    return model


def describe(model) -> str:
    """``yolo11n.yaml (scale n, nc 80)`` for a DetectionModel, from its YAML."""
    y = getattr(model, "yaml", {}) or {}
    name = Path(str(y.get("yaml_file", "") or "unknown model")).name
    return f"{name} (scale {y.get('scale', '?')}, nc {y.get('nc', getattr(model, 'nc', '?'))})"


def check_transfer(weights: str, source, baseline_model: str, nc: int) -> tuple[int, int]:
    """(tensors of the baseline that take the checkpoint's values, tensors of the baseline), the baseline built with
    the data's ``nc`` as the trainer builds it; an error naming both models when the share of the tensors outside
    the class branch is below MIN_TRANSFER."""
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.torch_utils import intersect_dicts

    with _quiet_logger():
        base = DetectionModel(baseline_model, nc=nc, verbose=False)
    target = base.state_dict()
    matched = intersect_dicts(source.float().state_dict(), target)
    n = len(matched)
    # the class branch's width follows nc (Ultralytics' load rebuilds it at the checkpoint's width): judge the rest
    head = f"model.{len(base.model) - 1}."
    cls = tuple(head + a for a in ("cv3.", "one2one_cv3."))
    rest = [k for k in target if not k.startswith(cls)]
    if sum(k in matched for k in rest) < MIN_TRANSFER * len(rest):
        raise ArgumentError(
            f"--pretrained {weights} does not fit the baseline: only {n}/{len(target)} of the baseline's tensors "
            f"would transfer. The checkpoint is {describe(source)}, the baseline is {describe(base)}. Fine-tune "
            "from weights of the same family and scale (a checkpoint trained on other classes fits), or choose the "
            "baseline that matches them with --family/--scale."
        )
    return n, len(target)
