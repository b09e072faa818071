"""Speed, parameters and GFLOPs of every registered module against the stock Ultralytics layer it stands in for.

The cases come from the registry: every conv-role module against a plain ``Conv(c1, c2, k, s)`` and every
repeat-role module against ``C2f(c1, c2, n, shortcut)``, at the shapes of YOLOv8n layers at imgsz 640. A module is
built with the arguments its constructor has (``k`` and ``s`` for the conv role, ``shortcut`` for the repeat role);
one that rejects a shape, or cannot take a stride the shape needs, or returns another output shape than the stock
layer, is reported as n/a with the reason. For each shape, module and stock layer are timed interleaved (see
:func:`~yolo_convplug.research.measure.median_ms`):

- eval forward without autograd, the same on the fused copies (``fused``), and train forward+backward;
- params and GFLOPs (``torch.utils.flop_counter``; Ultralytics' thop count goes to the CSV),

each printed as the module's figure and its ratio to the stock layer (``x stock`` < 1: faster or smaller).
"""

from __future__ import annotations

import argparse
import csv
import inspect
from pathlib import Path

import torch

from ..registry import registered
from .measure import deployed, forward_step, gflops, median_ms, thop_gflops, torch_threads, train_step

# (constructor args, feature-map size): YOLOv8n's 3x3 convs at P3-P5 and its four backbone C2f
CONV_SHAPES = [((64, 64, 3, 1), 80), ((128, 128, 3, 2), 40), ((256, 256, 3, 1), 20)]
C2F_SHAPES = [((32, 32, 1, True), 160), ((64, 64, 2, True), 80), ((128, 128, 2, True), 40), ((256, 256, 1, True), 20)]
HEADER = (
    f"{'module':<12}{'vs':<5}{'shape @map':<18}{'fwd ms':>9}{'x stock':>9}{'fused x':>9}{'fwd+bwd ms':>12}"
    f"{'x stock':>9}{'params x':>10}{'GFLOPs x':>10}"
)


class NotApplicable(Exception):
    """The module cannot stand in for the stock layer at this shape; the message says why."""


def stock_layer(role: str):
    """The Ultralytics class a module of ``role`` is compared with, and the shapes it is compared at."""
    from ultralytics.nn.modules import C2f, Conv

    return {"conv": (Conv, CONV_SHAPES), "repeat": (C2f, C2F_SHAPES)}.get(role, (None, []))


def build(cls: type, role: str, args: tuple) -> torch.nn.Module:
    """``cls`` at the stock layer's ``args``, passing only the arguments its constructor has."""
    names = set(inspect.signature(cls).parameters)
    c1, c2, third, fourth = args
    if role == "conv":
        k, s = third, fourth
        if "s" not in names and s != 1:
            raise NotApplicable(f"{cls.__name__} has no stride argument")
        kw = {name: v for name, v in (("k", k), ("s", s)) if name in names}
        return cls(c1, c2, **kw)
    return cls(c1, c2, third, **({"shortcut": fourth} if "shortcut" in names else {}))


def measure_pair(module, stock, c1: int, hw: int, batch: int, repeats: int, warmup: int) -> dict:
    """Times, params and GFLOPs of ``module`` and ``stock`` on a ``(batch, c1, hw, hw)`` input, and their ratios."""
    x = torch.randn(batch, c1, hw, hw)
    xg = x.clone().requires_grad_(True)
    models = {"module": module, "stock": stock}
    with torch.no_grad():
        outs = {k: m.eval()(x) for k, m in models.items()}
    if outs["module"].shape != outs["stock"].shape:
        raise NotApplicable(f"output {tuple(outs['module'].shape)}, the stock layer's {tuple(outs['stock'].shape)}")
    row = {}
    for k, m in models.items():
        row[f"params_{k}"] = sum(p.numel() for p in m.parameters())
        row[f"gflops_{k}"] = gflops(m.eval(), x[:1])
        row[f"gflops_thop_{k}"] = thop_gflops(m, x[:1])
    steps = {f"fwd_ms_{k}": forward_step(m.eval(), x) for k, m in models.items()}
    steps.update({f"fused_ms_{k}": forward_step(deployed(m), x) for k, m in models.items()})
    row.update(median_ms(steps, repeats, warmup))
    grads = {k: torch.randn_like(o) for k, o in outs.items()}
    row.update(median_ms({f"fwdbwd_ms_{k}": train_step(m.train(), xg, grads[k]) for k, m in models.items()}, repeats,
                         warmup))  # fmt: skip
    for col in ("fwd_ms", "fused_ms", "fwdbwd_ms", "params", "gflops"):
        row[f"{col}_ratio"] = row[f"{col}_module"] / row[f"{col}_stock"] if row[f"{col}_stock"] else float("nan")
    return row


def measure(cls: type, role: str, stock: type, args: tuple, hw: int, a: argparse.Namespace) -> dict:
    """:func:`measure_pair` of ``cls`` and ``stock`` at ``args``; NotApplicable when the constructor refuses them."""
    try:
        module = build(cls, role, args)
    except (ValueError, TypeError) as e:
        raise NotApplicable(str(e)) from e
    return measure_pair(module, stock(*args), args[0], hw, a.batch, a.repeats, a.warmup)


def format_row(name: str, stock: str, shape: str, row: dict) -> str:
    """One table line (see ``HEADER``)."""
    lead = f"{name:<12}{stock:<5}{shape:<18}"
    if "na" in row:
        line = lead + f"   n/a: {row['na']}"
        return line if len(line) <= 118 else line[:115] + "..."
    return (
        lead + f"{row['fwd_ms_module']:>9.2f}{row['fwd_ms_ratio']:>9.2f}{row['fused_ms_ratio']:>9.2f}"
        f"{row['fwdbwd_ms_module']:>12.2f}{row['fwdbwd_ms_ratio']:>9.2f}{row['params_ratio']:>10.2f}"
        f"{row['gflops_ratio']:>10.2f}"
    )


def write_csv(rows: list[dict], path: Path) -> None:
    """Every measured row (the union of columns)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)


def main(argv: list[str] | None = None) -> int:
    """``convplug bench`` / ``scripts/bench_modules.py``: measure, print the table, write the CSV; 0 unless a
    measurement failed."""
    p = argparse.ArgumentParser(
        prog="convplug bench",
        description=__doc__.split("\n\n")[0] + " Time: a few minutes on a 2-core CPU for every module and shape; "
        "--quick and --only cut that down.",
        epilog="examples:\n  convplug bench                # every module, every shape\n"
        "  convplug bench --quick --only CondConv PConv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--only", nargs="+", metavar="MODULE", help="registered module names to run (default: all)")
    p.add_argument("--quick", action="store_true", help="first shape per module, 3 repeats, 1 warm-up round")
    p.add_argument("--batch", type=int, default=8, help="batch size of the timed passes (default 8)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: PyTorch's default; default 1)")
    p.add_argument("--csv", default="runs/bench/bench_modules.csv", help="where to write every figure")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.warmup = 3, 1
    entries = registered()
    unknown = sorted(set(a.only or ()) - set(entries))
    if unknown:
        p.error(f"--only {' '.join(unknown)}: not registered; registered modules: {', '.join(entries)}")
    torch.manual_seed(0)
    print(
        f"{torch.get_num_threads() if not a.threads else a.threads} torch thread(s), batch {a.batch}, median of "
        f"{a.repeats} after {a.warmup} warm-up round(s); shape: c1,c2,k,s (Conv) or c1,c2,n (C2f) @ map size\n"
        "x stock: module / stock layer (< 1: faster or smaller); fused x: the same for fused eval copies"
    )
    print(HEADER)
    rows, failed = [], 0
    with torch_threads(a.threads), torch.random.fork_rng():
        for name, entry in entries.items():
            stock, shapes = stock_layer(entry.role)
            if (a.only and name not in a.only) or stock is None:
                continue
            for args, hw in shapes[:1] if a.quick else shapes:
                shape = ",".join(map(str, args[:3] if entry.role == "repeat" else args)) + f" @{hw}"
                row = {"module": name, "stock": stock.__name__, "args": str(args), "hw": hw, "batch": a.batch}
                try:
                    row.update(measure(entry.cls, entry.role, stock, args, hw, a))
                except NotApplicable as e:
                    row["na"] = str(e)
                except Exception as e:  # a broken module must not cost the other modules' figures
                    row["na"] = f"FAILED {type(e).__name__}: {e}"
                    failed += 1
                rows.append(row)
                print(format_row(name, stock.__name__, shape, row), flush=True)
    if rows:
        path = Path(a.csv)
        write_csv(rows, path)
        print(f"CSV: {path.resolve()}")
    return 1 if failed else 0
