"""Tell plug-in layers which training epoch starts, for modules with an epoch schedule (ODConv's temperature).

Installed into Ultralytics' default callbacks by :func:`yolo_convplug.integration.patch_tasks`, i.e. before any
trainer copies them, also in a ``yolo train`` run where the module classes are imported only while the model is
built. Any layer with a ``set_train_epoch(epoch)`` method takes part; nothing here imports a module file.
"""

from __future__ import annotations


def on_train_epoch_start(trainer) -> None:
    """Call ``set_train_epoch(trainer.epoch)`` on every layer of the trained model and of its EMA copy (which
    validates and is saved) that has that method."""
    ema = getattr(getattr(trainer, "ema", None), "ema", None)
    for model in (trainer.model, ema):
        for m in model.modules() if model is not None else ():
            if callable(getattr(m, "set_train_epoch", None)):
                m.set_train_epoch(trainer.epoch)


def install() -> None:
    """Add :func:`on_train_epoch_start` to Ultralytics' default callbacks (idempotent)."""
    from ultralytics.utils.callbacks.base import default_callbacks

    hooks = default_callbacks.setdefault("on_train_epoch_start", [])
    if on_train_epoch_start not in hooks:
        hooks.append(on_train_epoch_start)
