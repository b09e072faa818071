"""Warm start: plug-in layers inherit the pretrained weights of the stock layers they replace.

Ultralytics' ``pretrained=`` and ``YOLO(yaml).load(weights)`` go through ``BaseModel.load``, which copies every tensor
whose key and shape match. For a plug-in layer that is wrong in both directions: a CondConv would get the stock BN
statistics but random experts, an ScConv the statistics of a computation it does not do. :func:`load` (installed over
``BaseModel.load`` by the start-up hook) first visits every registered plug-in layer ``model.<i>`` and the layer at
the same index of the checkpoint:

- the same class (resuming, fine-tuning a ``best.pt``): nothing happens here; Ultralytics loads it as always;
- a stock layer the module replaces (``Conv``; ``C2f``/``C3k2`` for the repeat role): the module's own
  ``convert_from(stock)`` sets every tensor of the layer (see :mod:`yolo_convplug.registry`); a module without one,
  or one that raises ``ConversionError``, stays fresh;
- anything else (another architecture or scale): the layer stays fresh.

In the last two cases none of the checkpoint's ``model.<i>.*`` tensors reach the layer; everything else loads as
Ultralytics does. One line per plug-in layer that was not loaded as is follows Ultralytics' "Transferred N/M items",
saying its outcome: ``exact`` (converted; the class's ``conversion_error`` bounds the output error), ``approximate``
(converted, no bound: ``conversion_error = None`` or no such attribute) or ``fresh``. The same outcomes are kept as
data on the model, ``model._convplug_warm_start`` (see :func:`convert_layers`); approximate and fresh layers are
what :mod:`yolo_convplug.calibrate` fits to the stock layers before training.
"""

from __future__ import annotations

import functools
import types
import weakref

from .registry import ConversionError, registered, replaced_classes


class _WithoutLayers:
    """A checkpoint model whose ``state_dict()`` leaves out the given ``model.<i>.`` prefixes; all else delegates."""

    def __init__(self, model, prefixes: tuple[str, ...]):
        self._model, self._prefixes = model, prefixes

    def __getattr__(self, name):
        return getattr(self._model, name)

    def float(self):
        self._model.float()
        return self

    def state_dict(self, *args, **kwargs):
        return {k: v for k, v in self._model.state_dict(*args, **kwargs).items() if not k.startswith(self._prefixes)}


# models warm-started in this process: a plug-in model loaded from one of them inherits its records (Ultralytics 8.3's
# `yolo train pretrained=` loads the stock weights into the YOLO model, then builds the trainer's model from that)
_WARM_STARTED: weakref.WeakSet = weakref.WeakSet()


def _record(i: int, name: str, source: str, outcome: str, detail: str) -> dict:
    return {"layer": i, "module": name, "source": source, "outcome": outcome, "detail": detail}


def summary_line(r: dict) -> str:
    """The load summary's line for one record of ``model._convplug_warm_start``."""
    if r["outcome"] == "fresh":
        return f"layer {r['layer']} {r['module']}: {r['detail']}"
    return f"layer {r['layer']} {r['module']} <- {r['source']}: {r['outcome']} ({r['detail']})"


def convert_layers(model, source) -> tuple[list[str], tuple[str, ...]]:
    """Convert every plug-in layer of ``model`` from the stock layer at its index in ``source``.

    Stores one record per plug-in layer that was not loaded as is in ``model._convplug_warm_start`` (plain data, so
    it pickles into checkpoints): ``{"layer": i, "module": class name, "source": the checkpoint's class there,
    "outcome": "exact" | "approximate" | "fresh", "detail": text}``; calibration turns an outcome into "calibrated".

    Returns:
        the summary lines and the state-dict prefixes (``model.<i>.``) that the generic transfer must leave alone.
    """
    entries = {e.cls: e for e in registered().values()}
    src_layers = getattr(source, "model", None)
    records, prefixes = [], []
    for i, layer in enumerate(getattr(model, "model", ())):
        entry = entries.get(type(layer))
        if entry is None:
            continue
        name = type(layer).__name__
        src = src_layers[i] if src_layers is not None and i < len(src_layers) else None
        if type(src) is type(layer):
            continue  # same module: loaded as is by Ultralytics
        prefixes.append(f"model.{i}.")
        src_name = type(src).__name__ if src is not None else "nothing"
        if src is None or not isinstance(src, replaced_classes(entry.cls, entry.role)):
            records.append(_record(i, name, src_name, "fresh", f"checkpoint has {src_name} here, not a layer {name} "
                                                               "replaces; skipped, fresh"))
        elif not callable(getattr(layer, "convert_from", None)):
            records.append(_record(i, name, src_name, "fresh", f"no conversion from {src_name}, fresh"))
        else:
            try:
                detail = layer.convert_from(src)
            except ConversionError as e:
                records.append(_record(i, name, src_name, "fresh", f"no conversion from {src_name}, fresh ({e})"))
                continue
            bound = getattr(type(layer), "conversion_error", None)
            outcome = "approximate" if bound is None else "exact"
            records.append(_record(i, name, src_name, outcome, str(detail)))
    if records:
        model._convplug_warm_start = records
        _WARM_STARTED.add(model)
    elif source in _WARM_STARTED and hasattr(source, "_convplug_warm_start"):  # a copy of a fresh warm start
        model._convplug_warm_start = [dict(r) for r in source._convplug_warm_start]
        _WARM_STARTED.add(model)
    return [summary_line(r) for r in records], tuple(prefixes)


def patch_load(tasks: types.ModuleType) -> None:
    """Wrap ``tasks.BaseModel.load`` so that plug-in layers convert before Ultralytics' generic transfer."""
    original = getattr(tasks.BaseModel, "load", None)
    if original is None or getattr(original, "_yolo_convplug", False):
        return

    @functools.wraps(original)
    def load(self, weights, verbose=True):
        source = (weights.get("ema") or weights["model"]) if isinstance(weights, dict) else weights
        source = source.float()
        lines, prefixes = convert_layers(self, source)
        result = original(self, _WithoutLayers(source, prefixes) if prefixes else source, verbose)
        if verbose and lines:
            from ultralytics.utils import LOGGER

            for line in lines:
                LOGGER.info(f"yolo-convplug warm start: {line}")
        return result

    load._yolo_convplug = True
    tasks.BaseModel.load = load
