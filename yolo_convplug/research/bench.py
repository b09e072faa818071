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

``--compile`` wraps module and stock layer (and their fused copies) in ``torch.compile`` the same way before timing;
the ratios are then each module compiled against its stock layer compiled. With timm installed, timm's
``CondConv2d`` (the same routing, BN and activation as ``CondConv``) is timed against ``Conv`` as a comparison row.
``--models`` times whole models instead: every shipped variant of a family fused at batch 1, in PyTorch and in ONNX
Runtime on the CPU, interleaved with the baseline, next to its GFLOPs ratio.
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


def measure_pair(module, stock, c1: int, hw: int, batch: int, repeats: int, warmup: int, compile: bool = False,
                 device: str = "cpu", amp: str = "none") -> dict:
    """Times, params and GFLOPs of ``module`` and ``stock`` on a ``(batch, c1, hw, hw)`` input, and their ratios;
    ``compile``: each timed callable's model goes through ``torch.compile`` first (module and stock alike);
    ``device``/``amp`` (``fp16``, ``bf16``): where and under which autocast the timed passes run."""
    wrap = (lambda m: torch.compile(m, dynamic=False)) if compile else (lambda m: m)  # one static graph per shape
    module, stock = module.to(device), stock.to(device)
    x = torch.randn(batch, c1, hw, hw, device=device)
    sync = torch.cuda.synchronize if x.is_cuda else None
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)

    def autocast(step):
        def run():
            with torch.autocast(x.device.type, dtype, enabled=dtype is not None):
                step()

        return run

    def time_steps(steps):
        return median_ms({k: autocast(f) for k, f in steps.items()}, repeats, warmup, sync)

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
    steps = {f"fwd_ms_{k}": forward_step(wrap(m.eval()), x) for k, m in models.items()}
    steps.update({f"fused_ms_{k}": forward_step(wrap(deployed(m)), x) for k, m in models.items()})
    row.update(time_steps(steps))
    grads = {k: torch.randn_like(o) for k, o in outs.items()}
    row.update(time_steps({f"fwdbwd_ms_{k}": train_step(wrap(m.train()), xg, grads[k]) for k, m in models.items()}))
    for col in ("fwd_ms", "fused_ms", "fwdbwd_ms", "params", "gflops"):
        row[f"{col}_ratio"] = row[f"{col}_module"] / row[f"{col}_stock"] if row[f"{col}_stock"] else float("nan")
    return row


def measure(cls: type, role: str, stock: type, args: tuple, hw: int, a: argparse.Namespace) -> dict:
    """:func:`measure_pair` of ``cls`` and ``stock`` at ``args``; NotApplicable when the constructor refuses them."""
    try:
        module = build(cls, role, args)
    except (ValueError, TypeError) as e:
        raise NotApplicable(str(e)) from e
    return measure_pair(module, stock(*args), args[0], hw, a.batch, a.repeats, a.warmup, a.compile, a.device, a.amp)


def timm_condconv(c1: int, c2: int, k: int, s: int) -> torch.nn.Module:
    """timm's ``CondConv2d`` with ``CondConv``'s routing (GAP, linear, sigmoid over 8 experts), BN and SiLU.

    Raises ``NotApplicable`` without timm (optional: ``pip install timm``)."""
    try:
        from timm.layers import CondConv2d
    except ImportError as e:
        raise NotApplicable("timm is not installed (pip install timm)") from e
    from torch import nn

    class TimmCondConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.route = nn.Linear(c1, 8)
            self.conv = CondConv2d(c1, c2, k, s, padding=k // 2, num_experts=8)
            self.bn, self.act = nn.BatchNorm2d(c2), nn.SiLU()

        def forward(self, x):
            return self.act(self.bn(self.conv(x, torch.sigmoid(self.route(x.mean((2, 3)))))))

    return TimmCondConv()


def _onnx_session(model: torch.nn.Module, x: torch.Tensor):
    """An ONNX Runtime CPU session (one thread) of ``model`` exported at ``x`` (opset 19: DeformConv included)."""
    import io
    import warnings

    import onnxruntime as ort

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), f, dynamo=False, opset_version=19, input_names=["images"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(f.getvalue(), options, providers=["CPUExecutionProvider"])


def measure_models(family: str, imgsz: int, repeats: int, warmup: int) -> list[dict]:
    """Fused batch-1 latency of the baseline and every shipped variant of ``family`` (PyTorch; ONNX Runtime when
    installed), all timed interleaved, and each one's GFLOPs, with ratios to the baseline."""
    from ultralytics.nn.tasks import DetectionModel

    from .variants import default_variants, resolve_variant

    x = torch.zeros(1, 3, imgsz, imgsz)
    variants = [resolve_variant(v, family) for v in default_variants(family)]
    models = {v.name: deployed(DetectionModel(v.model, verbose=False)) for v in variants}
    steps = {f"pt {name}": forward_step(m, x) for name, m in models.items()}
    try:
        sessions = {name: _onnx_session(m, x) for name, m in models.items()}
        feed = {"images": x.numpy()}
        steps.update({f"ort {name}": (lambda s=s: s.run(None, feed)) for name, s in sessions.items()})
    except ImportError:
        pass  # no onnx/onnxruntime: PyTorch figures only
    times = median_ms(steps, repeats, warmup)
    rows = []
    for name, m in models.items():
        row = {"model": name, "imgsz": imgsz, "gflops": gflops(m, x), "pt_ms": times[f"pt {name}"],
               "ort_ms": times.get(f"ort {name}", float("nan"))}
        rows.append(row)
    for row in rows:
        for col in ("gflops", "pt_ms", "ort_ms"):
            row[f"{col}_ratio"] = row[col] / rows[0][col]
    return rows


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
    p.add_argument("--compile", action="store_true", help="time module and stock layer both under torch.compile")
    p.add_argument("--device", default="cpu", help="where the timed passes run (cpu, cuda, cuda:1; default cpu)")
    p.add_argument("--amp", default="none", choices=("none", "fp16", "bf16"), help="autocast of the timed passes")
    p.add_argument("--models", action="store_true",
                   help="whole models instead: each shipped variant's fused batch-1 latency (PyTorch, ONNX Runtime) "
                   "and GFLOPs against the baseline's")
    p.add_argument("--family", default="yolov8", help="--models: the family whose variants to time (default yolov8)")
    p.add_argument("--imgsz", type=int, default=640, help="--models: image size (default 640)")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.warmup = 3, 1
    if a.models:
        return main_models(a)
    entries = registered()
    unknown = sorted(set(a.only or ()) - set(entries))
    if unknown:
        p.error(f"--only {' '.join(unknown)}: not registered; registered modules: {', '.join(entries)}")
    torch.manual_seed(0)
    print(
        f"{torch.get_num_threads() if not a.threads else a.threads} torch thread(s), batch {a.batch}, median of "
        f"{a.repeats} after {a.warmup} warm-up round(s){', torch.compile' if a.compile else ''}; shape: c1,c2,k,s "
        "(Conv) or c1,c2,n (C2f) @ map size\n"
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
                if name == "CondConv":  # the reference implementation most users would otherwise take
                    row = {"module": "timm CondConv2d", "stock": stock.__name__, "args": str(args), "hw": hw,
                           "batch": a.batch}
                    try:
                        row.update(measure_pair(timm_condconv(*args), stock(*args), args[0], hw, a.batch, a.repeats,
                                                a.warmup, a.compile, a.device, a.amp))
                    except NotApplicable as e:
                        row["na"] = str(e)
                    rows.append(row)
                    print(format_row("timm Cond", stock.__name__, shape, row), flush=True)
    if rows:
        path = Path(a.csv)
        write_csv(rows, path)
        print(f"CSV: {path.resolve()}")
    return 1 if failed else 0


def main_models(a: argparse.Namespace) -> int:
    """``convplug bench --models``: the deployed table (see :func:`measure_models`)."""
    print(f"{a.family} variants, fused, batch 1, imgsz {a.imgsz}, {a.threads or torch.get_num_threads()} thread(s), "
          f"median of {a.repeats}, interleaved; x base: ratio to the baseline")
    print(f"{'model':<24}{'GFLOPs':>8}{'x base':>8}{'PyTorch ms':>12}{'x base':>8}{'ORT ms':>9}{'x base':>8}")
    with torch_threads(a.threads):
        rows = measure_models(a.family, a.imgsz, a.repeats, a.warmup)
    for r in rows:
        print(f"{r['model']:<24}{r['gflops']:>8.2f}{r['gflops_ratio']:>8.2f}{r['pt_ms']:>12.1f}{r['pt_ms_ratio']:>8.2f}"
              f"{r['ort_ms']:>9.1f}{r['ort_ms_ratio']:>8.2f}")
    path = Path(a.csv).with_name("bench_models.csv")
    write_csv(rows, path)
    print(f"CSV: {path.resolve()}")
    return 0
