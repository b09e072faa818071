"""Benchmark every yolo-convplug module against the layer it replaces and against its naive reference.

For each module at YOLOv8n-like shapes it measures, in one run and interleaved repeat by repeat (module, baseline,
reference, module, ...) so drift on a shared machine hits all three alike:

- eval forward (``torch.no_grad``), the same after fusing (module's ``fuse()`` then Ultralytics' Conv-BN folding,
  module and baseline only) and train forward+backward (random upstream gradient, input requiring grad), median
  milliseconds over ``--repeats`` after ``--warmup`` untimed rounds;
- params, and GFLOPs per image (batch 1) two ways: Ultralytics' counter (``thop``, 2 x MACs, what ``model.info()``
  shows; it only sees ``nn.Conv2d``-like layers, so convolutions done with ``F.conv2d`` count as 0) and PyTorch's
  ``FlopCounterMode`` (every aten conv/matmul, whatever module issues it);
- the ratios to the plain Ultralytics ``Conv(c1, c2, k, s)`` (``C2f(c1, c2, n)`` for C2f_Faster) and to the naive
  reference ``make_reference`` of ``tests/ref_<module>.py``;

then checks the targets of the issue per module (PASS/MISS with the margin, worst shape counts) and writes a CSV.
A module or reference file that does not exist yet is skipped with a message.

    python scripts/bench_modules.py            # full run, one thread
    python scripts/bench_modules.py --quick    # first shape per module, 3 repeats
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from yolo_convplug.modules._utils import fuse_convs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the naive references live next to the tests


@dataclass
class Case:
    """One module: how to build it and its baseline from a shape tuple, the shapes, and the issue's targets."""

    name: str  # the class, called with the shape's args (+ kwargs)
    file: str  # yolo_convplug/modules/<file>.py and tests/ref_<file>.py
    baseline: str  # "Conv" or "C2f", from ultralytics.nn.modules, called with the same args
    shapes: list  # (args, feature-map size, batch)
    targets: list  # (column, threshold, strict): PASS when the worst shape's value is <= (or <) threshold
    kwargs: dict = field(default_factory=dict)


CONV_SHAPES = [((64, 64, 3, 1), 80, 8), ((128, 128, 3, 2), 40, 8), ((256, 256, 3, 1), 20, 8)]
C2F_SHAPES = [((32, 32, 1, True), 160, 8), ((64, 64, 2, True), 80, 8), ((128, 128, 2, True), 40, 8)]
C2F_SHAPES += [((256, 256, 1, True), 20, 8)]  # the four C2f of a YOLOv8n backbone at imgsz 640, batch 8
FWD, FWDBWD, PARAMS, FLOPS = ("fwd/base", "fwdbwd/base", "params/base", "gflops_aten/base")
CASES = [
    Case("SAConv2d", "saconv", "Conv", CONV_SHAPES, [(FWDBWD, 2.2, False)]),
    Case("DSConv2d", "dsconv", "Conv", CONV_SHAPES, [(FWD, 1.05, False)]),
    Case(
        "ScConv",
        "scconv",
        "Conv",
        CONV_SHAPES,
        [(FWD, 0.9, False), (FWDBWD, 0.9, False), (PARAMS, 1.0, True), (FLOPS, 1.0, True)],
    ),
    Case(
        "CondConv",
        "condconv",
        "Conv",
        CONV_SHAPES + [(args, hw, 16) for args, hw, _ in CONV_SHAPES],
        [(FWDBWD, 1.1, False)],
        {"experts": 8},
    ),
    Case("C2f_Faster", "faster", "C2f", C2F_SHAPES, [(FWD, 0.8, False), (FWDBWD, 0.8, False), (PARAMS, 1.0, True)]),
]


def load(module_path: str, attr: str | None = None):
    """Import ``module_path`` (and return ``attr`` of it), or print why not and return None."""
    try:
        module = importlib.import_module(module_path)
        return getattr(module, attr) if attr else module
    except (ImportError, AttributeError) as e:
        print(f"  skip {module_path}{'.' + attr if attr else ''}: {e}")
        return None


def median_ms(steps: dict, repeats: int, warmup: int) -> dict:
    """Time the zero-argument callables of ``steps`` interleaved, rotating who goes first; median ms per name."""
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(warmup + repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
            t = time.perf_counter()
            steps[name]()
            if r >= warmup:
                times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def forward_step(m, x):
    """Eval forward without autograd."""

    def step():
        with torch.no_grad():
            m(x)

    return step


def train_step(m, x, grad):
    """Train forward+backward with fresh gradients, as after ``optimizer.zero_grad(set_to_none=True)``."""

    def step():
        m.zero_grad(set_to_none=True)
        x.grad = None
        m(x).backward(grad)

    return step


def gflops(m, x) -> tuple[float, float]:
    """GFLOPs of one forward: Ultralytics' thop count (2 x MACs) and PyTorch's aten count."""
    import thop

    m = copy.deepcopy(m).eval()
    thop_flops = thop.profile(copy.deepcopy(m), inputs=(x,), verbose=False)[0] * 2 / 1e9
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m(x)
    return thop_flops, counter.get_total_flops() / 1e9


def deployed(m):
    """A fused eval copy, as the patched ``BaseModel.fuse`` makes it: the module's ``fuse()``, then Ultralytics'."""
    m = copy.deepcopy(m).eval()
    if callable(getattr(m, "fuse", None)):
        m = m.fuse()
    return fuse_convs(m)


def measure(models: dict, c1: int, hw: int, batch: int, repeats: int, warmup: int) -> dict:
    """All numbers of one shape for the models ``{"": module, "base": baseline, "ref": reference}``."""
    x = torch.randn(batch, c1, hw, hw)
    xg = x.clone().requires_grad_(True)
    with torch.no_grad():
        grads = {k: torch.randn_like(m.train()(x)) for k, m in models.items()}
    row = {}
    for k, m in models.items():
        row[f"params{k}"] = sum(p.numel() for p in m.parameters())
        row[f"gflops_thop{k}"], row[f"gflops_aten{k}"] = gflops(m, x[:1])
    fused = {f"{k}_fused": deployed(models[k]) for k in ("", "base")}
    evals = {**{k: m.eval() for k, m in models.items()}, **fused}
    fwd = median_ms({k: forward_step(m, x) for k, m in evals.items()}, repeats, warmup)
    fwdbwd = median_ms({k: train_step(m.train(), xg, grads[k]) for k, m in models.items()}, repeats, warmup)
    row.update({f"fwd{k}": v for k, v in fwd.items()})
    row.update({f"fwdbwd{k}": v for k, v in fwdbwd.items()})
    row["fwd_fused/base"] = row["fwd_fused"] / row["fwdbase_fused"]
    for k in ("base", "ref"):
        if k in models:
            for col in ("fwd", "fwdbwd", "params", "gflops_thop", "gflops_aten"):
                row[f"{col}/{k}"] = row[col] / row[f"{col}{k}"] if row[f"{col}{k}"] else float("nan")
    return row


def verdict(case: Case, rows: list) -> list[str]:
    """PASS/MISS per target: the worst shape's value against the threshold, with the margin (and the summed ratio)."""
    lines = []
    for col, threshold, strict in case.targets:
        worst = max(rows, key=lambda r: r[col])
        value = worst[col]
        ok = value < threshold if strict else value <= threshold
        op = "<" if strict else "<="
        num, den = col.split("/")
        total = sum(r[num] for r in rows) / sum(r[num + den] for r in rows)
        lines.append(
            f"  {case.name:<11} {col:<17} {'PASS' if ok else 'MISS'}  worst {value:.3f} {op} {threshold} "
            f"(margin {threshold - value:+.3f}, {(threshold - value) / threshold:+.0%}) at {worst['shape']} "
            f"b{worst['batch']}; all shapes summed {total:.3f}"
        )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="first shape per module, 3 repeats, 1 warm-up")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--only", nargs="*", help="module names to run (default: all)")
    parser.add_argument("--csv", default="runs/bench/bench_modules.csv")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup = 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from ultralytics.nn.modules import C2f, Conv

    baselines = {"Conv": Conv, "C2f": C2f}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU, median of {args.repeats} "
        f"(+{args.warmup} warm-up), module/baseline/reference interleaved"
    )

    rows, verdicts = [], []
    for case in CASES:
        if args.only and case.name not in args.only:
            continue
        print(f"\n{case.name} vs {case.baseline}")
        build = load(f"yolo_convplug.modules.{case.file}", case.name)
        if build is None:
            verdicts.append(f"  {case.name:<11} skipped: module missing")
            continue
        ref = load(f"ref_{case.file}")
        make_reference = getattr(ref, "make_reference", None)
        case_rows = []
        try:  # a module still being written must not cost the other modules' results
            for shape_args, hw, batch in case.shapes[:1] if args.quick else case.shapes:
                models = {"": build(*shape_args, **case.kwargs), "base": baselines[case.baseline](*shape_args)}
                if make_reference:
                    models["ref"] = make_reference(*shape_args)
                row = {"module": case.name, "shape": str(shape_args), "hw": hw, "batch": batch}
                row.update(measure(models, shape_args[0], hw, batch, args.repeats, args.warmup))
                case_rows.append(row)
                print(format_row(row))
        except Exception as e:
            print(f"  failed: {type(e).__name__}: {e}")
            verdicts.append(f"  {case.name:<11} failed at {shape_args}: {type(e).__name__}: {e}")
        rows += case_rows
        if case_rows:
            verdicts += verdict(case, case_rows)

    print("\nTargets (issue 2), worst shape:")
    print("\n".join(verdicts))
    write_csv(rows, ROOT / args.csv if not Path(args.csv).is_absolute() else Path(args.csv))


def format_row(r: dict) -> str:
    """One table line: times, ratios to the baseline and the reference, params and GFLOPs."""
    ref = (
        f" | ref {r['fwdref']:7.1f}/{r['fwdbwdref']:7.1f} ms x{r['fwd/ref']:.2f}/x{r['fwdbwd/ref']:.2f}"
        if "fwdref" in r
        else " | ref -"
    )
    return (
        f"  {r['shape']:<22} {r['hw']:>3}x{r['hw']:<3} b{r['batch']:<2}"
        f" fwd {r['fwd']:7.1f} fwd+bwd {r['fwdbwd']:7.1f} ms"
        f" | base {r['fwdbase']:7.1f}/{r['fwdbwdbase']:7.1f} ms x{r['fwd/base']:.2f}/x{r['fwdbwd/base']:.2f}"
        f" fused fwd {r['fwd_fused']:.1f}/{r['fwdbase_fused']:.1f} ms x{r['fwd_fused/base']:.2f}{ref}"
        f" | params {r['params']:>7} (x{r['params/base']:.2f}) GFLOPs thop {r['gflops_thop']:.3f}"
        f" aten {r['gflops_aten']:.3f} (x{r['gflops_aten/base']:.2f})"
    )


def write_csv(rows: list, path: Path) -> None:
    """Write every measured row (the union of columns; a missing reference leaves its cells empty)."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    print(f"\nCSV: {path}")


if __name__ == "__main__":
    main()
