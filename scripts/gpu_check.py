"""What a GPU's minutes should measure, in one run: ``python scripts/gpu_check.py`` on a CUDA machine.

1. ``convplug bench`` on CUDA in fp32 and under fp16 and bf16 autocast (every module against its stock layer);
2. each shipped yolov8n variant and the baseline trained ``--steps`` optimizer steps with ``amp=True`` on the
   synthetic ``shapes`` set: median step time and final training loss, each against the baseline's;
3. a two-variant ``convplug ablate --ray --gpus-per-run 0.5`` against the same ablation in-process (skipped, with a
   line saying so, where this convplug has no ``--ray``).

Everything goes to ``--out`` (default runs/gpu_check): one log per part and ``summary.md``. ``--dry-run`` runs the
same code on the CPU at toy size (quick bench of two modules, two variants, 3 steps at imgsz 64, the ablation line
printed, not run) to check the script itself without a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], log: Path) -> int:
    """Run ``cmd``, its output to ``log``; print the command and its exit status."""
    print("$", " ".join(cmd), f"> {log}", flush=True)
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    print(f"  exit {rc}", flush=True)
    return rc


def bench(a, out: Path) -> list[str]:
    """Part 1: the module bench per precision; returns summary lines."""
    lines = ["## convplug bench", ""]
    extra = ["--quick", "--only", "PConv", "SAConv2d"] if a.dry_run else []
    for amp in ("none", "fp16", "bf16"):
        if a.dry_run and amp == "fp16":
            continue  # CPU autocast float16 convolutions are not what a GPU run measures
        log = out / f"bench_{amp}.txt"
        rc = run([sys.executable, "-m", "yolo_convplug.cli", "bench", "--device", a.device, "--amp", amp,
                  "--csv", str(out / f"bench_{amp}.csv"), *extra], log)
        lines.append(f"- {amp}: exit {rc}, table in `{log.name}`")
    return lines


def train_variant(model: str, a, data: str) -> dict:
    """Train ``model`` for ``a.steps`` optimizer steps (amp); median step time (s) and the last mean loss."""
    import torch
    from ultralytics import YOLO

    yolo = YOLO(model)
    times, state = [], {}

    def start(trainer):
        state["t"] = time.perf_counter()

    def end(trainer):
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - state["t"])
        state["loss"] = _total(trainer.tloss)
        if len(times) >= a.steps:
            raise StopTraining

    yolo.add_callback("on_train_batch_start", start)
    yolo.add_callback("on_train_batch_end", end)
    try:
        yolo.train(data=data, epochs=10**6 if not a.dry_run else 1, imgsz=a.imgsz, batch=a.batch, device=a.device,
                   amp=not a.dry_run, workers=2, val=False, plots=False, project=str(a.out), name="train",
                   exist_ok=True, verbose=False, seed=0)
    except StopTraining:
        pass
    warm = times[min(10, len(times) // 2):]  # the first steps include cudnn autotuning and data-loader start
    return {"step_s": statistics.median(warm) if warm else float("nan"), "loss": state.get("loss", float("nan")),
            "steps": len(times)}


def _total(loss) -> float:
    """The summed mean training loss: a tensor of loss items (Ultralytics 8.3) or a dict of them (8.4)."""
    if loss is None:
        return float("nan")
    return float(sum(loss.values()) if isinstance(loss, dict) else loss.sum())


class StopTraining(Exception):
    """Raised from the batch callback once the wanted number of steps is reached."""


def train(a, out: Path) -> list[str]:
    """Part 2: every variant's amp training step time and loss against the baseline's."""
    from yolo_convplug.research.data import make_shapes
    from yolo_convplug.research.variants import default_variants, resolve_variant

    data = str(make_shapes())
    names = default_variants("yolov8")
    if a.dry_run:
        names = names[:2]
    rows = {}
    for name in names:
        v = resolve_variant(name)
        try:
            rows[v.name] = train_variant(v.model, a, data)
        except Exception as e:  # noqa: BLE001  (one broken variant must not cost the others' figures)
            rows[v.name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"  {v.name}: {rows[v.name]}", flush=True)
    base = rows[next(iter(rows))]
    lines = ["## amp training", "", f"{a.steps} steps, batch {a.batch}, imgsz {a.imgsz}, shapes set, {a.device}", "",
             "| model | step ms | x base | loss | x base |", "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | |")
            continue
        lines.append(f"| {name} | {1e3 * r['step_s']:.1f} | {r['step_s'] / base['step_s']:.2f} | {r['loss']:.3f} | "
                     f"{r['loss'] / base['loss']:.2f} |")
    return lines


def ablate_ray(a, out: Path) -> list[str]:
    """Part 3: ``--ray --gpus-per-run 0.5`` against in-process, two variants, one epoch each."""
    cli = [sys.executable, "-m", "yolo_convplug.cli", "ablate"]
    help_text = subprocess.run([*cli, "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    common = ["baseline", "saconv", "epochs=1", "imgsz=320"]
    ray = [*cli, *common, "--ray", "--gpus-per-run", "0.5", "--out", str(out / "ablate_ray")]
    local = [*cli, *common, "--out", str(out / "ablate_local")]
    if "--ray" not in help_text:
        return ["## ablate --ray", "", "skipped: this convplug ablate has no --ray"]
    if a.dry_run:
        return ["## ablate --ray", "", "dry run, not run:", "", f"    {' '.join(ray)}", f"    {' '.join(local)}"]
    lines = ["## ablate --ray", ""]
    for label, cmd in (("ray, 0.5 GPU per run", ray), ("in-process", local)):
        t = time.perf_counter()
        rc = run(cmd, out / f"ablate_{label.split(',')[0].replace(' ', '_')}.txt")
        lines.append(f"- {label}: exit {rc}, {time.perf_counter() - t:.0f} s wall")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks the script, measures nothing")
    p.add_argument("--steps", type=int, default=300, help="training steps per variant (default 300)")
    p.add_argument("--batch", type=int, default=32, help="training batch (default 32)")
    p.add_argument("--imgsz", type=int, default=640, help="training image size (default 640)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    p.add_argument("--skip", nargs="*", default=[], choices=("bench", "train", "ablate"), help="parts to leave out")
    a = p.parse_args()
    import torch

    if a.dry_run:
        a.device, a.steps, a.batch, a.imgsz = "cpu", 3, 4, 64
    elif not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU machine, or --dry-run to check the script on the CPU")
    else:
        a.device = "cuda"
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if a.device == "cuda" else "CPU (dry run)"
    lines = [f"# gpu_check on {device}, torch {torch.__version__}", ""]
    for part, fn in (("bench", bench), ("train", train), ("ablate", ablate_ray)):
        if part not in a.skip:
            lines += [*fn(a, a.out), ""]
    (a.out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
