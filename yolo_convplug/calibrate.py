"""Calibrated warm start: plug-in layers without an exact conversion learn the stock layer's function before training.

A layer the warm start left ``fresh`` or only ``approximate`` (see :mod:`yolo_convplug.warm_start`) would make the
fine-tuning measure its start rather than the module. :func:`calibrate` fits each such layer ``model.model[i]`` to
the stock layer at the same index: it records the stock model's activations on a batch of real images (forward
hooks), then minimises the normalised output error ``||f(x) - y_stock||^2 / ||y_stock||^2`` with a bounded number of
Adam steps in eval mode (BN a fixed affine, so the stock statistics of copied parts stay valid), and finally
re-estimates the layer's BN running statistics on the same inputs, folding the change into each BN's affine so the
fitted function is kept. With ``sequential=True`` (default) a layer's input ``x`` is what the partly calibrated
model itself feeds it, so earlier layers' remaining errors are compensated instead of compounding with depth (one
forward of the model, a pre-hook fitting each layer as its input arrives); with ``False`` it is the stock layer's
input. A fit that does not lower the error, or is still above its starting loss 50 steps in (diverged: it is
stopped there rather than run to the end), is retried once at a tenth of the learning rate; a layer whose error
still does not drop is restored as it was.

:func:`install` adds :func:`on_pretrain_routine_end` to Ultralytics' default callbacks (the start-up hook calls it),
so ``yolo train model=<plug-in yaml> pretrained=<stock .pt>`` calibrates once, after the data loader is built and
before the first epoch, on ``YOLO_CONVPLUG_CALIBRATE_IMAGES`` training images (default 32) with
``YOLO_CONVPLUG_CALIBRATE_STEPS`` steps per layer (default: each layer's :func:`default_steps`);
``YOLO_CONVPLUG_CALIBRATE=0`` turns it off.
"""

from __future__ import annotations

import copy
import os
import sys
import time
import types

import torch

DEFAULT_STEPS = 100
DEFAULT_IMAGES = 32
DEFAULT_LR = 1e-2
DEFAULT_BATCH = 8  # images per Adam step
DIVERGENCE_CHECK = 50  # steps after which a fit still above its starting loss is given up
DIVERGENCE_WINDOW = 10  # last steps before the check whose mean loss is compared with the starting loss
NEEDS_CALIBRATION = ("approximate", "fresh")


def layer_io(model, indices, images: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Input and output of ``model.model[i]`` for each ``i`` on ``images`` (eval, no grad)."""
    seen, hooks = {}, []
    for i in indices:
        hooks.append(model.model[i].register_forward_hook(lambda m, a, y, i=i: seen.__setitem__(i, (a[0], y))))
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    return seen


def relative_error(layer, x: torch.Tensor, y: torch.Tensor) -> float:
    """``||layer(x) - y|| / ||y||`` (Frobenius norms over the batch), ``layer`` in eval mode."""
    training = layer.training
    with torch.no_grad():
        out = layer.eval()(x)
    layer.train(training)
    return ((out - y).norm() / y.norm().clamp_min(1e-12)).item()


def reestimate_bn(layer, x: torch.Tensor) -> None:
    """Set the running statistics of every BN inside ``layer`` to their averages over the batch ``x``, keeping the
    layer's eval-mode function: each BN's affine ``gamma, beta`` absorbs the change of ``mean, var``.

    So a layer fitted in eval mode keeps its fit, and a train-mode step (batch statistics) starts where eval is."""
    bns = [m for m in layer.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine]
    old = [(bn.running_mean.clone(), bn.running_var.clone(), bn.momentum) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    training = layer.training
    with torch.no_grad():
        layer.train()(x)
        for bn, (mean, var, momentum) in zip(bns, old):
            ratio = ((bn.running_var + bn.eps) / (var + bn.eps)).sqrt()
            bn.bias += bn.weight * (bn.running_mean - mean) / (var + bn.eps).sqrt()
            bn.weight *= ratio
            bn.momentum = momentum
    layer.train(training)


def fit_layer(layer, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = DEFAULT_LR,
              batch: int = DEFAULT_BATCH, start_loss: float | None = None) -> bool:
    """``steps`` Adam steps on ``||layer(x) - y||^2 / ||y||^2`` in eval mode (BN a fixed affine, so copied parts keep
    their statistics), each on the next ``batch`` samples of ``x`` in turn, then BN statistics re-estimated on all of
    ``x`` without changing the function.

    With ``start_loss`` (the loss before the fit), a fit whose mean loss over steps 41-50 is still above it has
    diverged (too high a rate for this layer, which then never comes back below its start): it stops there, without
    re-estimating BN, and returns False so that the caller can restore the layer and retry at a lower rate, instead
    of spending the remaining steps. Otherwise returns True."""
    params = [p for p in layer.parameters() if p.requires_grad]
    if params and steps:
        fused = {p.device.type for p in params} <= {"cpu", "cuda"}  # one kernel per tensor: a 3x faster step
        opt = torch.optim.Adam(params, lr=lr, fused=fused)
        layer.eval()
        n, window = len(x), 0.0
        for step in range(steps):
            idx = torch.arange(step * batch, step * batch + min(batch, n)) % n
            xb, yb = x[idx], y[idx]
            opt.zero_grad(set_to_none=True)
            loss = (layer(xb) - yb).pow(2).sum() / yb.pow(2).sum().clamp_min(1e-12)
            loss.backward()
            opt.step()
            if start_loss is not None and DIVERGENCE_CHECK - DIVERGENCE_WINDOW <= step < DIVERGENCE_CHECK:
                window += loss.item()
                if step == DIVERGENCE_CHECK - 1 and not window / DIVERGENCE_WINDOW <= start_loss:  # above, or NaN
                    return False
    reestimate_bn(layer, x)
    return True


def default_steps(layer) -> int:
    """Adam steps for ``layer`` when none are given: its class's ``calibration_steps`` (a module whose fit needs more,
    such as ``C2f_Faster``, sets it beside its class), else ``DEFAULT_STEPS``."""
    return getattr(type(layer), "calibration_steps", DEFAULT_STEPS)


def pending_layers(model, stock) -> list[int]:
    """Indices of the plug-in layers to calibrate: warm-start outcome approximate or fresh, with a stock layer at the
    same index of the class the module replaces (another architecture's layer gives no target)."""
    from .registry import registered, replaced_classes

    entries = {e.cls: e for e in registered().values()}
    records = {r["layer"]: r for r in getattr(model, "_convplug_warm_start", ())}
    out = []
    for i, layer in enumerate(model.model):
        entry = entries.get(type(layer))
        if entry is None or i >= len(stock.model) or type(stock.model[i]) is type(layer):
            continue
        if not isinstance(stock.model[i], replaced_classes(entry.cls, entry.role)):
            continue
        record = records.get(i)
        if record is not None:
            needs = record["outcome"] in NEEDS_CALIBRATION
        else:  # loaded some other way: judge by the class (no conversion, or one without a bound)
            needs = getattr(type(layer), "conversion_error", None) is None
        if needs:
            out.append(i)
    return out


def calibrate(model, stock, images: torch.Tensor, steps: int | None = None, lr: float = DEFAULT_LR,
              sequential: bool = True, layers: list[int] | None = None) -> list[str]:
    """Fit every plug-in layer of ``model`` that has no exact conversion to the stock layer at its index.

    Args:
        model: a plug-in DetectionModel already loaded from ``stock`` (``model.load(stock)``, ``pretrained=``).
        stock: the stock DetectionModel (float); only read.
        images: a float (B, 3, H, W) batch in [0, 1], on the models' device.
        steps: Adam steps per layer; None gives each layer its :func:`default_steps`.
        lr: Adam learning rate.
        sequential: fit each layer on the input the partly calibrated ``model`` gives it (True) or on the stock
            layer's input (False).
        layers: the indices to calibrate; default :func:`pending_layers`.

    Returns:
        one summary line per layer; the layer's record in ``model._convplug_warm_start`` gets outcome
        "calibrated" and a ``calibration`` dict (error before/after, images, steps, seconds, kept) when it improved.
    """
    is_batch = isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == 3
    if not (is_batch and images.is_floating_point()):
        raise ValueError(f"calibrate: images must be a float (B, 3, H, W) batch in [0, 1], got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"calibrate: steps={steps!r} is not valid; use an integer >= 1, e.g. {DEFAULT_STEPS}")
    indices = pending_layers(model, stock) if layers is None else list(layers)
    if not indices:
        return []
    records = {r["layer"]: r for r in getattr(model, "_convplug_warm_start", ())}
    targets = layer_io(stock, indices, images)
    training = model.training
    lines = []

    def fit(i: int, x: torch.Tensor) -> None:
        """Fit layer ``i`` on its input ``x`` to the stock layer's output; append its line, update its record."""
        t = time.perf_counter()
        layer, name = model.model[i], type(model.model[i]).__name__
        y = targets[i][1]
        if not isinstance(y, torch.Tensor) or layer.eval()(x[:1]).shape[1:] != y.shape[1:]:
            lines.append(f"layer {i} {name}: not calibrated (its output shape differs from the stock layer's)")
            return
        n_steps = default_steps(layer) if steps is None else steps
        saved = copy.deepcopy(layer.state_dict())
        before = relative_error(layer, x, y)
        for rate in (lr, lr / 10):  # a fit that diverges is retried once at a tenth of the rate
            with torch.enable_grad():
                converged = fit_layer(layer, x, y, n_steps, rate, start_loss=before**2)
            after = relative_error(layer, x, y)
            kept = converged and after < before
            if kept:
                break
            layer.load_state_dict(saved)
        seconds = time.perf_counter() - t
        how = f"{len(images)} images, {n_steps} steps, {seconds:.1f} s"
        if kept:
            lines.append(f"layer {i} {name}: calibrated, error {before:.3f} -> {after:.3f} ({how})")
        else:
            lines.append(f"layer {i} {name}: calibration did not lower its error ({before:.3f} -> {after:.3f}, "
                         f"{how}); left as it was")
        record = records.get(i)
        if record is not None:
            record["calibration"] = {"error_before": before, "error_after": after, "images": len(images),
                                     "steps": n_steps, "seconds": seconds, "kept": kept, "sequential": sequential}
            if kept:
                record["outcome"] = "calibrated"

    if sequential:  # one forward of the model: each layer is fitted when its input arrives, before it runs
        def on_input(i):
            def hook(module, args):
                hooks.pop(i).remove()  # first: the fit itself calls the layer
                fit(i, args[0])
            return hook

        hooks = {i: model.model[i].register_forward_pre_hook(on_input(i)) for i in indices}
        try:
            with torch.no_grad():
                model.eval()(images)
        finally:
            for h in hooks.values():
                h.remove()
    else:
        for i in indices:
            fit(i, targets[i][0])
    model.train(training)
    return lines


def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name, "")
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        unset = f"default {default}" if default is not None else "or leave it unset for each layer's default"
        raise ValueError(f"{name}={value!r} is not valid; use an integer >= 1 ({unset})")
    return int(value)


def training_images(loader, n: int) -> torch.Tensor:
    """The first ``n`` images of an Ultralytics train loader, float in [0, 1]."""
    batches, count = [], 0
    for batch in loader:
        batches.append(batch["img"][: n - count])
        count += len(batches[-1])
        if count >= n:
            break
    return torch.cat(batches).float() / 255


def on_pretrain_routine_end(trainer) -> None:
    """Calibrate the trainer's model once before the first epoch (fresh runs with ``pretrained=<weights>`` only)."""
    if os.environ.get("YOLO_CONVPLUG_CALIBRATE", "1") == "0" or trainer.args.resume or trainer.start_epoch > 0:
        return
    weights = trainer.args.pretrained
    if not isinstance(weights, (str, os.PathLike)) or not getattr(trainer, "train_loader", None):
        return
    from ultralytics.utils import LOGGER, RANK

    from .ultralytics_compat import load_checkpoint, unwrap_model

    model = unwrap_model(trainer.model)
    if not any(r["outcome"] in NEEDS_CALIBRATION for r in getattr(model, "_convplug_warm_start", ())):
        return
    if RANK in {-1, 0}:
        stock = load_checkpoint(weights)[0].float().to(trainer.device).eval()
        images = training_images(trainer.train_loader, _env_int("YOLO_CONVPLUG_CALIBRATE_IMAGES", DEFAULT_IMAGES))
        steps = _env_int("YOLO_CONVPLUG_CALIBRATE_STEPS", None)  # unset: each layer's default_steps
        for line in calibrate(model, stock, images.to(trainer.device), steps=steps):
            LOGGER.info(f"yolo-convplug calibration: {line}")
    if RANK != -1 and torch.distributed.is_initialized():  # every rank starts from rank 0's calibrated weights
        for tensor in model.state_dict().values():
            torch.distributed.broadcast(tensor, 0)
    if getattr(trainer, "ema", None) is not None:  # the EMA was copied from the model before this callback
        trainer.ema.ema.load_state_dict(model.state_dict())


def install() -> None:
    """Add :func:`on_pretrain_routine_end` to Ultralytics' default callbacks (idempotent)."""
    from ultralytics.utils.callbacks.base import default_callbacks

    hooks = default_callbacks.setdefault("on_pretrain_routine_end", [])
    if on_pretrain_routine_end not in hooks:
        hooks.append(on_pretrain_routine_end)


class _CallableModule(types.ModuleType):
    """``yolo_convplug.calibrate`` names both this module and its function (the import system binds the package
    attribute to the module once it is imported), so calling the module calls :func:`calibrate`."""

    def __call__(self, *args, **kwargs):
        return calibrate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
