"""Checks every module test runs: relative error, CPU bf16 autocast, and an ONNX round trip with a dynamic batch."""

from __future__ import annotations

import io
import warnings

import pytest
import torch


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
    """max|a - b| / max|b|, floored (some exact gradients are 0, and then both sides are rounding noise)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item()


def onnx_outputs(module: torch.nn.Module, example: torch.Tensor, batches=(1, 3)):
    """Export ``module`` (eval) at ``example``'s batch with a dynamic batch axis (TorchScript exporter, opset 17) and
    yield ``(onnxruntime output, PyTorch output)`` for random inputs of each batch size in ``batches``."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), f, dynamo=False, opset_version=17, input_names=["x"],
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
