"""Latency and GFLOPs: the one implementation behind the module bench and the ablation.

- :func:`median_ms` times zero-argument callables interleaved round by round, rotating which one goes first, so that
  drift on a shared machine hits all of them alike: median milliseconds over ``repeats`` after ``warmup`` untimed
  rounds. :func:`latency_ms` is its one-model case (batch-1 inference latency).
- :func:`gflops` is 2 x the multiply-accumulates of one forward pass counted by ``torch.utils.flop_counter``: every
  aten convolution and matmul, and torchvision's ``deform_conv2d`` as DCNv2's thop rule counts it, so a module
  that convolves with kernels built in ``forward`` counts whatever its implementation. :func:`thop_gflops` is
  Ultralytics' own count (thop, with the rules the modules register), the figure ``model.info()`` shows.
- :func:`deployed` is the fused eval copy that inference runs: a model's (patched) ``BaseModel.fuse``, or for a
  single layer its own ``fuse()`` followed by Ultralytics' Conv-BN folding.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import statistics
import time
from typing import Callable

import torch
from torch import nn

from ..modules._utils import fuse_convs


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch threads (None or 0: unchanged), restoring the previous count afterwards."""
    saved = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def median_ms(
    steps: dict[str, Callable[[], object]], repeats: int, warmup: int = 2, sync: Callable[[], None] | None = None
) -> dict[str, float]:
    """Median milliseconds per call of each of ``steps``, timed interleaved (see module docstring).

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after each timed call so that asynchronous devices
    are timed to completion.
    """
    sync = sync or (lambda: None)
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            t = time.perf_counter()
            steps[name]()
            sync()
            if r >= warmup:
                times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def forward_step(m: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """An eval forward pass of ``m`` on ``x`` without autograd."""

    def step():
        with torch.no_grad():
            m(x)

    return step


def train_step(m: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """A forward and backward pass of ``m`` (upstream gradient ``grad``) from fresh gradients, as after
    ``optimizer.zero_grad(set_to_none=True)``."""

    def step():
        m.zero_grad(set_to_none=True)
        x.grad = None
        m(x).backward(grad)

    return step


def latency_ms(model: nn.Module, x: torch.Tensor, runs: int = 50, warmup: int = 10, threads: int | None = 1) -> float:
    """Median milliseconds of one eval forward pass of ``model`` on ``x`` (on ``x``'s device); CPU timings use
    ``threads`` torch threads."""
    sync = torch.cuda.synchronize if x.is_cuda else None
    with torch_threads(None if x.is_cuda else threads):
        return median_ms({"model": forward_step(model.eval(), x)}, runs, warmup, sync)["model"]


@functools.cache
def _count_deform_conv2d() -> None:
    """Teach the flop counter torchvision's ``deform_conv2d`` (it counts aten ops only, so DCNv2's main
    convolution counted zero): 2 x its MACs, the convolution's and, as DCNv2's thop rule counts them, the bilinear
    sampling (4) and modulation (1) of each sampled value."""
    import torchvision  # noqa: F401  (registers torch.ops.torchvision)
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.torchvision.deform_conv2d)
    def deform_conv2d_flop(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        batch, c_out, h, w = out_shape
        taps = weight_shape[2] * weight_shape[3]
        return 2 * batch * h * w * taps * (c_out * weight_shape[1] + 5 * input_shape[1])


def gflops(m: nn.Module, x: torch.Tensor) -> float:
    """GFLOPs (2 x multiply-accumulates) of ``m(x)`` counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    _count_deform_conv2d()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m(x)
    return counter.get_total_flops() / 1e9


def thop_gflops(m: nn.Module, x: torch.Tensor) -> float:
    """GFLOPs of ``m(x)`` as Ultralytics counts them (thop, 2 x MACs, on a copy); NaN without thop."""
    try:
        import thop
    except ImportError:
        return math.nan
    return thop.profile(copy.deepcopy(m).eval(), inputs=(x,), verbose=False)[0] * 2 / 1e9


def deployed(m: nn.Module) -> nn.Module:
    """A fused eval copy of ``m``: ``BaseModel.fuse`` for a model; else the layer's ``fuse()``, then Conv-BN folding."""
    from ultralytics.nn.tasks import BaseModel

    m = copy.deepcopy(m).eval()
    if isinstance(m, BaseModel):
        return m.fuse(verbose=False)
    if callable(getattr(m, "fuse", None)):
        m.fuse()
    return fuse_convs(m)
