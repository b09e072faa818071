"""Time the three formulations of a per-sample convolution (each sample its own kernel, as CondConv and ODConv
compute it) against one dense convolution of the same shape: the floor of the dynamic convs' ratio to Conv, before
routing, BN and activation.

    python scripts/per_sample_conv_forms.py [--batch 8] [--repeats 12]

Forms: one grouped convolution with the batch folded into the channels, differentiated by PyTorch (oneDNN's grouped
backward) or by one convolution backward per sample (what the modules train with on CPU); a loop of batch-1 dense
convolutions; and im2col + batched matmul (what they export). Each ratio is fwd+bwd (input and kernel
gradients, from fresh gradients) unless marked fwd, timed interleaved with the dense convolution in one run
(``median_ms``, as ``convplug bench``), on one thread.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from yolo_convplug.modules._per_sample_conv import TrainableGroupedConv, grouped_conv, out_size
from yolo_convplug.research.measure import median_ms, torch_threads

SHAPES = [(64, 1, 80), (128, 2, 40), (256, 1, 20)]  # (channels, stride, map side): convplug bench's shapes


def forms(c: int, s: int, size: int, batch: int) -> dict:
    """The timed callables for a (c, c, 3, s) convolution over (batch, c, size, size)."""
    x = torch.randn(batch, c, size, size, requires_grad=True)
    weight = torch.randn(c, c, 3, 3, requires_grad=True)
    kernels = torch.randn(batch, c, c, 3, 3, requires_grad=True)
    flat = kernels.detach().reshape(batch, c, -1).requires_grad_()
    side = out_size(size, 3, s, 1, 1)
    grad = torch.randn(batch, c, side, side)

    def backward(forward):
        """A fwd+bwd step of ``forward`` from fresh gradients, as after ``zero_grad(set_to_none=True)``."""

        def step():
            x.grad = weight.grad = kernels.grad = flat.grad = None
            forward().backward(grad)

        return step

    return {
        "dense": backward(lambda: F.conv2d(x, weight, None, s, 1)),
        "grouped": backward(lambda: grouped_conv(x, kernels, s, 1, 1, 1)),
        "grouped, per-sample bwd": backward(lambda: TrainableGroupedConv.apply(x, kernels, s, 1, 1, 1)),
        "per-sample loop": backward(lambda: torch.cat([F.conv2d(x[i : i + 1], kernels[i], None, s, 1)
                                                       for i in range(batch)])),
        "im2col+bmm": backward(lambda: (flat @ F.unfold(x, 3, 1, 1, s)).view(batch, c, side, side)),
        "fwd dense": lambda: F.conv2d(x.detach(), weight.detach(), None, s, 1),
        "fwd grouped": lambda: grouped_conv(x.detach(), kernels.detach(), s, 1, 1, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=12, help="timed rounds; the median is reported")
    args = parser.parse_args()
    with torch_threads(1):
        for c, s, size in SHAPES:
            median = median_ms(forms(c, s, size, args.batch), args.repeats)
            ratios = ", ".join(f"{name} {t / median['dense']:.2f}" for name, t in median.items() if name != "dense")
            print(f"({c},{c},3,{s})@{size}, batch {args.batch}: dense fwd+bwd {median['dense']:.0f} ms; {ratios}")

if __name__ == "__main__":
    main()
