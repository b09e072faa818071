"""Prove that a swapped model YAML builds: build it with the Ultralytics model class its head or task needs, run the
model's own forward and compare every layer's output shape with the source model's; a failure names the layer.
Used by :func:`yolo_convplug.swap.swap_yaml`."""

from __future__ import annotations

import copy

import torch

from .model_yaml import ModelYamlError, row_error, rows
from .ultralytics_compat import HEAD_MODELS, TASK_MODELS

VERIFY_SIZE = 256  # the input of Ultralytics' own stride pass (DetectionModel), used where a model has none




class SwapError(ModelYamlError):
    """A swap that cannot build; the message names the layer index, the module and why."""


def _with_scale(d: dict, scale: str) -> dict:
    return {**copy.deepcopy(d), "scale": scale or next(iter(d.get("scales") or {"": 0}))}


def model_class(d: dict) -> type:
    """The Ultralytics model class that builds ``d``: the one its head needs (``WorldModel`` for ``WorldDetect``,
    ...), else the one for its task (``DetectionModel``, ``SegmentationModel``, ...)."""
    from ultralytics.nn import tasks

    name = HEAD_MODELS.get(rows(d)[-1][2]) or TASK_MODELS.get(tasks.guess_model_task(d), "DetectionModel")
    return getattr(tasks, name)


def _shapes(x):
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, (list, tuple)):
        return [_shapes(t) for t in x]
    if isinstance(x, dict):
        return {k: _shapes(v) for k, v in x.items()}
    return None


def _layer_index(m: torch.nn.Module) -> int | None:
    """The index ``parse_model`` attached to a top-level layer (``m.i``; with ``m.f``, ``m.type``, ``m.np``)."""
    i = getattr(m, "i", None)
    return i if isinstance(i, int) and hasattr(m, "f") and hasattr(m, "np") else None


def trace(d: dict, ch: int = 3) -> tuple[dict[int, object], Exception | None, int | None]:
    """Build ``d`` with its Ultralytics model class and run the model's own forward (the stride pass of its
    constructor, else one at ``VERIFY_SIZE``); return (layer index -> output shapes, error or None, index of the
    layer that raised or None)."""
    seen, entered = {}, []

    def pre(m, _):
        if _layer_index(m) is not None:
            entered.append(m.i)

    def post(m, _, out):
        if _layer_index(m) is not None:
            seen.setdefault(m.i, _shapes(out))

    hooks = [
        torch.nn.modules.module.register_module_forward_pre_hook(pre),
        torch.nn.modules.module.register_module_forward_hook(post),
    ]
    try:
        model = model_class(d)(copy.deepcopy(d), ch=ch, verbose=False)
        if not seen:
            with torch.no_grad():
                model.eval()(torch.zeros(1, ch, VERIFY_SIZE, VERIFY_SIZE))
    except Exception as e:
        failed = next((i for i in reversed(entered) if i not in seen), None)
        return seen, e, failed
    finally:
        for h in hooks:
            h.remove()
    return seen, None, None


def verify(d: dict, scale: str = "", original: dict | None = None, ch: int = 3) -> str | None:
    """Build ``d`` at ``scale`` as Ultralytics does, run its forward and, given the ``original`` model dict, require
    every layer's output shape to match the original's.

    Returns:
        None when verified; a sentence saying why the check could not run when ``original`` itself does not build
        and run here (the swap is then unverified, not refused).

    Raises:
        SwapError: naming the layer that does not build, fails or changes its output shape.
    """
    d = _with_scale(d, scale)
    layers = rows(d)
    ref = {}
    if original is not None:
        ref, error, _ = trace(_with_scale(original, d["scale"]), ch)
        if error is not None:
            return (
                f"the source model itself does not build and run as a {model_class(original).__name__} here "
                f"({type(error).__name__}: {error})"
            )
    seen, error, failed = trace(d, ch)
    differs = next((j for j in sorted(seen) if j in ref and seen[j] != ref[j]), None)
    if error is not None:
        if isinstance(error, ModelYamlError):
            raise SwapError(str(error)) from error
        if failed is None:
            raise SwapError(
                f"the swapped model does not build as a {model_class(d).__name__}: {type(error).__name__}: {error}"
            ) from error
        culprit = failed if differs is None else differs
        why = "it fails" if differs is None else f"its output {seen[differs]} differs from the original {ref[differs]}"
        raise row_error(
            culprit,
            layers[culprit],
            f"{why}; the forward fails at layer {failed} ({layers[failed][2]}): {type(error).__name__}: {error}",
            SwapError,
        ) from error
    if differs is not None:
        raise row_error(
            differs,
            layers[differs],
            f"output shape {seen[differs]} differs from the original layer's {ref[differs]}; a swap must keep every "
            "layer's output shape",
            SwapError,
        )
    return None
