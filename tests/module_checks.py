"""Helpers the module tests share: relative error, non-trivial BN statistics, CPU autocast, an ONNX round trip with a
dynamic batch, and the contract cases (how to build each registered module and the stock layer it stands in for)."""

from __future__ import annotations

import inspect
import io
import warnings
from typing import NamedTuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
    """max|a - b| / max|b|, floored (some exact gradients are 0, and then both sides are rounding noise)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item()


def mean_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean|a - b| / mean|b|: robust to the few elements a hard gate (ScConv's SRU) may flip under rounding."""
    a, b = a.float(), b.float()
    return ((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12)).item()


def norm_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius norms over the whole batch)."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters and every all-zero parameter small random values
    (zero-initialised context convs, switches, weight differences), so that folding BN and module-specific paths
    see values a trained checkpoint would have, not identities."""
    g = torch.Generator().manual_seed(seed)

    def uniform(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            uniform(m.running_mean, -0.2, 0.2)
            uniform(m.running_var, 0.5, 2.0)
            if m.affine:
                uniform(m.weight, 0.5, 1.5)
                uniform(m.bias, -0.2, 0.2)
    for p in module.parameters():
        if p.is_floating_point() and not p.any():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module


def random_stock_conv(c1: int, c2: int, k: int = 3, s: int = 1, g: int = 1, d: int = 1, seed: int = 2,
                      p: int | None = None) -> nn.Module:
    """An Ultralytics ``Conv(c1, c2, k, s, p, g, d)`` in eval mode with non-trivial BN (``randomize_``) and a kernel
    of non-zero mean, as a trained stock layer to convert from."""
    from ultralytics.nn.modules import Conv

    stock = randomize_(Conv(c1, c2, k, s, p, g, d), seed=seed).eval()
    with torch.no_grad():
        stock.conv.weight.normal_(0.02, 0.1, generator=torch.Generator().manual_seed(seed))
    return stock


def bn_eval(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn`` in eval, on its running statistics, as a function (no module state read but its tensors)."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def stock_conv_reference(stock: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An eval-mode stock ``Conv`` written out: zero-padded strided (dilated, grouped) convolution, BN on its running
    statistics, SiLU."""
    c = stock.conv
    return F.silu(bn_eval(F.conv2d(x, c.weight, None, c.stride, c.padding, c.dilation, c.groups), stock.bn))


def assert_converts_exactly(m: nn.Module, stock: nn.Module, x: torch.Tensor) -> None:
    """``m.convert_from(stock)`` reports an exact conversion, and ``m`` in eval then gives the written-out stock
    layer's output shape and values within the class's ``conversion_error``."""
    assert m.convert_from(stock).startswith("exact")
    with torch.no_grad():
        y, ref = m.eval()(x), stock_conv_reference(stock, x)
    assert y.shape == ref.shape
    assert norm_rel_err(y, ref) < type(m).conversion_error


def onnx_outputs(module: torch.nn.Module, example: torch.Tensor, batches=(1, 3), opset: int = 17):
    """Export ``module`` (eval) at ``example``'s batch with a dynamic batch axis (TorchScript exporter, ``opset``) and
    yield ``(onnxruntime output, PyTorch output)`` for random inputs of each batch size in ``batches``."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), f, dynamo=False, opset_version=opset, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    session = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    for batch in batches:
        x = torch.randn(batch, *example.shape[1:])
        with torch.no_grad():
            expected = module(x)
        yield torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), expected


def bf16_forward(module: torch.nn.Module, x: torch.Tensor):
    """``(output under CPU bf16 autocast, fp32 output)`` of ``module`` in its current mode."""
    ref = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return module(x), ref


def bf16_training_grads_finite(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """A train-mode backward under CPU bf16 autocast gives every parameter a finite gradient."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module.train()(x).float().sum().backward()
    return all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


# --- contract cases: every registered module, built as a YAML row would build it --------------------------------


def takes_kernel_and_stride(cls: type) -> bool:
    """Whether the constructor follows Ultralytics ``Conv(c1, c2, k, s, ...)`` (k and s as 3rd and 4th arguments)."""
    try:
        names = list(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return False
    return names[2:4] == ["k", "s"]


class Case(NamedTuple):
    """One registered module built with positional ``args``, as Ultralytics' parser would call it."""

    name: str
    cls: type
    role: str
    args: tuple

    @property
    def id(self) -> str:
        return f"{self.name}-" + "-".join(map(str, self.args))

    @property
    def c1(self) -> int:
        return self.args[0]

    def build(self, seed: int = 0) -> nn.Module:
        """A fresh module (seeded); skips the test, with the module's reason, if it rejects these arguments."""
        torch.manual_seed(seed)
        try:
            return self.cls(*self.args)
        except ValueError as e:
            pytest.skip(f"{self.name}{self.args} is not a valid construction: {e}")

    def stock_args(self) -> tuple:
        """The arguments of the stock layer of the same geometry: ``(c1, c2, k, s)`` with the module's own defaults
        for ``k`` and ``s`` (``Conv`` defaults to k=1), ``(c1, c2, n)`` for the repeat role, ``(c1, c1)`` for keep."""
        if self.role == "repeat":
            return self.args[:3]
        if self.role == "keep":
            return (self.c1, self.c1)
        if not takes_kernel_and_stride(self.cls):
            return self.args[:2]
        defaults = [p.default for p in list(inspect.signature(self.cls).parameters.values())[2:4]]
        return tuple(self.args[:4]) + tuple(defaults[len(self.args) - 2 :])

    def stock(self, args: tuple | None = None, seed: int = 0) -> nn.Module:
        """The stock Ultralytics layer the module stands in for, built with ``args`` (default ``stock_args()``):
        ``Conv`` (conv and keep roles) or ``C2f`` (repeat role)."""
        from ultralytics.nn.modules import C2f, Conv

        torch.manual_seed(seed)
        return (C2f if self.role == "repeat" else Conv)(*(args or self.stock_args()))

    def input(self, batch: int = 2, h: int = 10, w: int = 13, scale: float = 1.0, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, self.c1, h, w, generator=g) * scale


def contract_cases(entries: dict) -> list[Case]:
    """The cases of every registered module: ``cls(16, 16)`` and ``cls(16, 32, 3, 2)`` for the conv role (``cls(16,
    32)`` when the constructor has no ``k, s``), ``cls(16, 32, 2)`` for the repeat role, ``cls(16)`` for keep."""
    cases = []
    for name, e in entries.items():
        if e.role == "conv":
            wide = (16, 32, 3, 2) if takes_kernel_and_stride(e.cls) else (16, 32)
            cases += [Case(name, e.cls, e.role, (16, 16)), Case(name, e.cls, e.role, wide)]
        elif e.role == "repeat":
            cases.append(Case(name, e.cls, e.role, (16, 32, 2)))
        else:
            cases.append(Case(name, e.cls, e.role, (16,)))
    return cases
