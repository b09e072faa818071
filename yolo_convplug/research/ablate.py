"""Ablation: train a baseline and module variants under identical settings and seeds, then report.

Each run (variant x seed) trains with Ultralytics, from scratch or fine-tuned from the same ``pretrained=`` weights
(plug-in layers start from the stock layers they replace, see :mod:`yolo_convplug.warm_start`), and records params,
GFLOPs, CPU latency (fused model, batch 1), GPU latency where CUDA is available, training wall time, mAP50 and
mAP50-95 of Ultralytics' final validation of ``best.pt``, and the in-training mAP50-95 of ``best.pt``'s epoch (the
checkpoint check of :mod:`yolo_convplug.research.report`).

The concerns live in their own modules: :mod:`.plan` (settings, jobs, reuse of finished runs), :mod:`.run` (one
run's training, output redirection and epoch callbacks, ``done.json``), :mod:`.execute` (the executors that run many
jobs), :mod:`.progress` (the console) and :mod:`.report` (tables and plot). This module ties them together and holds
the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import textwrap
from pathlib import Path

from .checks import check_local_data, check_train_args, check_transfer, load_weights
from .data import resolve_data, same_images
from .execute import InProcess, RayExecutor, RayUnavailable, connect_ray, default_resources, ray_resources
from .plan import (
    DEFAULT_DATA,
    FINETUNE_DEFAULTS,
    SEED_SPREAD_MAP5095,
    TRAIN_DEFAULTS,
    is_default_protocol,
    load_done,
    plan_jobs,
    pretrained_arg,
    protocol_defaults,
    settings_key,
    sha256,
)
from .progress import Progress
from .report import Protocol, console_summary, summarize, write_results
from .run import EpochWatch, first_epoch_map, run_one, validate_start  # noqa: F401  (public names of the ablation)
from .variants import DEFAULT_FAMILY, default_variants, families, resolve_variant, slugs
from .workflow import parse_overrides


class AblationFailed(RuntimeError):
    """Some runs of an ablation failed (the others finished and are reported)."""


class AblationInterrupted(Exception):
    """Ctrl-C: ``finished`` of ``total`` runs are done and kept in ``out``; the same command resumes."""

    def __init__(self, finished: int, total: int, out: Path):
        super().__init__(f"{finished} of {total} runs finished")
        self.finished, self.total, self.out = finished, total, out


def data_label(data_spec, data: str) -> str:
    """The data as the report names it: a ``shapes`` spec as given, the generated set as ``shapes`` also when it was
    the offline fallback, else the data YAML's file name."""
    if str(data_spec).startswith("shapes"):
        return str(data_spec)
    return "shapes" if Path(data).parent.name.startswith("shapes-v") else Path(data).name


def check_inputs(baseline, data: str, train_args: dict) -> tuple[int, int] | None:
    """Check the train arguments, the data and the weights once, before any run (:mod:`.checks`); return the
    (transferred, total) tensors of the baseline when fine-tuning."""
    check_train_args(train_args)
    nc = (check_local_data(data) or {}).get("nc")
    weights = train_args.get("pretrained")
    if not weights or not Path(str(weights)).suffix == ".pt" or not (Path(weights).is_file() or "/" in str(weights)):
        return None  # training from scratch, or an Ultralytics weights name it downloads
    source = load_weights(weights)
    return check_transfer(weights, source, baseline.model, nc or int(getattr(source, "nc", 80)))


def start_map(weights: str, data: str, train_args: dict, out: Path) -> float:
    """The weights' own mAP50-95 on ``data`` (:func:`~.run.validate_start`), validated once per weights, data, imgsz
    and batch and kept in ``<out>/start.json``."""
    key = {"weights_sha256": sha256(Path(weights)), "data": data, "imgsz": train_args["imgsz"],
           "batch": train_args["batch"]}  # fmt: skip
    path = out / "start.json"
    try:
        saved = json.loads(path.read_text())
        if saved["key"] == key:
            return saved["mAP50-95"]
    except (OSError, ValueError, KeyError):
        pass
    value = validate_start(weights, data, train_args, out / "start" / "val.log")
    path.write_text(json.dumps({"key": key, "mAP50-95": value}, indent=2))
    return value


def ablate(
    variants: list[str] | None = None,
    data: str | None = DEFAULT_DATA,
    out: str | Path = "runs/ablate",
    seeds: list[int] = (0,),
    scale: str = "n",
    family: str = DEFAULT_FAMILY,
    latency_runs: int = 50,
    latency_threads: int = 1,
    quiet: bool = True,
    ray: str | None = None,
    cpus_per_run: float | None = None,
    gpus_per_run: float | None = None,
    keep_weights_on_worker: bool = False,
    **train_overrides,
) -> list[dict]:
    """Train every variant with every seed under identical settings; write results.csv/.md/.png; return the rows.

    Args:
        variants: variant specs (see :func:`~yolo_convplug.research.variants.resolve_variant`); default: the
            baseline and every shipped YAML of ``family`` (the control only when fine-tuning). The first is the
            baseline.
        data: dataset (see :func:`~yolo_convplug.research.data.resolve_data`): ``shapes`` (default), a data YAML,
            or None for COCO128 resolution.
        out: output folder; runs go to ``<out>/runs/<variant>/seed<k>``.
        seeds: training seeds; several give mean ± std and the beyond-spread marks.
        scale: scale letter of the baseline and short variant names.
        family: model family of the baseline and short variant names (``yolov8``, ``yolo11``, ...).
        latency_runs: timed forward passes per latency figure (after 10 warm-up passes).
        latency_threads: torch threads for the CPU latency (1: stable on shared machines).
        quiet: send Ultralytics' output to each run's ``train.log`` instead of the console (progress stays).
        ray: None to train in this process, one run after another; 'local' to start a local Ray with this
            machine's CPUs and GPUs, or a cluster address (``auto``, ``ray://head:10001``) to join: each run is a Ray
            task and as many train at once as the resources hold.
        cpus_per_run: CPUs (and torch threads) of a Ray run; default the CPUs divided by the runs at once.
        gpus_per_run: GPUs of a Ray run (fractions share a GPU); default 1 where there are GPUs, else 0.
        keep_weights_on_worker: leave each Ray run's best.pt on its worker instead of sending it back.
        **train_overrides: Ultralytics train arguments replacing ``TRAIN_DEFAULTS`` (epochs, imgsz, batch, device,
            ``pretrained=WEIGHTS`` to fine-tune every variant and the baseline from the same weights, which
            replaces them with ``FINETUNE_DEFAULTS`` and adds the control to the default variants, ...).
    """
    started_ray = connect_ray(ray) if ray else False  # before any work: Ray missing or a silent address
    try:
        return _ablate(variants, data, out, seeds, scale, family, latency_runs, latency_threads, quiet, ray,
                       cpus_per_run, gpus_per_run, keep_weights_on_worker, train_overrides)  # fmt: skip
    finally:
        if started_ray:
            import ray as ray_module

            ray_module.shutdown()


def _ablate(variants, data, out, seeds, scale, family, latency_runs, latency_threads, quiet, ray, cpus_per_run,
            gpus_per_run, keep_weights_on_worker, train_overrides) -> list[dict]:  # fmt: skip
    out = Path(out).resolve()
    pretrained = pretrained_arg(train_overrides.get("pretrained"))  # None: from scratch
    vs = [resolve_variant(v, family, scale) for v in (variants or default_variants(family, control=bool(pretrained)))]
    names = [v.name for v in vs]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    data_spec, data = data, resolve_data(data)
    train_args = {**protocol_defaults(bool(pretrained)), **train_overrides, "pretrained": pretrained or False}
    train_args.setdefault("nbs", train_args["batch"])  # one optimizer step per batch (see TRAIN_DEFAULTS)
    kind = "finetune" if pretrained else "scratch"
    label = data_label(data_spec, data)
    transfer = check_inputs(vs[0], data, train_args)
    protocol = Protocol(
        data=label,
        epochs=train_args["epochs"],
        imgsz=train_args["imgsz"],
        seeds=tuple(seeds),
        pretrained=pretrained,
        same_images=same_images(data),
        seed_spread=SEED_SPREAD_MAP5095[kind] if is_default_protocol(data_spec, train_args) else None,
    )
    if transfer and Path(pretrained).is_file():
        protocol = dataclasses.replace(protocol, start_map=start_map(pretrained, data, train_args, out))
    jobs = plan_jobs(vs, seeds, out, train_args, data)
    done = {job: load_done(job) for job in jobs}
    heads = {job: f"[{j}/{len(jobs)}] {job.label}" for j, job in enumerate(jobs, 1)}
    progress = Progress(sum(row is None for row in done.values()))
    progress.log(f"ablation: {len(vs)} variant(s) x {len(seeds)} seed(s): {protocol.title()}")
    progress.log(f"data: {data}; output: {out}")
    if protocol.same_images:
        progress.log(f"note: {label} validates on its training images: this measures fitting, not generalisation")
    for job, row in done.items():
        if row is not None:
            progress.log(f"{heads[job]}: reused (done.json), mAP50-95 {row['mAP50-95']:.3f}")
    if ray:
        cpus, gpus = default_resources(*ray_resources())
        cpus, gpus = cpus_per_run or cpus, gpus if gpus_per_run is None else gpus_per_run
        executor = RayExecutor(data_spec, data, train_args, latency_runs, latency_threads, quiet, cpus, gpus,
                               keep_weights_on_worker)  # fmt: skip
    else:
        executor = InProcess(data, train_args, latency_runs, latency_threads, quiet)
    failed = []
    if transfer:
        n, total = transfer
        progress.log(f"weights: {n}/{total} of the baseline's tensors take their values from {pretrained}")
    if protocol.start_map is not None:
        progress.log(f"start: the weights validate at {protocol.start_map:.3f} mAP50-95 on {label} before training")
    try:
        for job, row, error in executor.run([(heads[j], j) for j in jobs if done[j] is None], progress):
            if error is not None:
                failed.append((job.variant.name, job.seed, error))
            done[job] = row
    except KeyboardInterrupt:
        raise AblationInterrupted(sum(row is not None for row in done.values()), len(jobs), out) from None
    rows = [row for row in done.values() if row is not None]
    if protocol.start_map is not None:
        first = tuple((j.seed, first_epoch_map(j.run_dir)) for j in jobs if j.variant is vs[0] and done[j] is not None)
        protocol = dataclasses.replace(protocol, first_epochs=first)
    if rows:
        paths = write_results(rows, out, protocol, settings_key(None, train_args, data), latency_threads)
        summary = console_summary(summarize(rows), protocol)
        progress.log("\n" + "\n".join(textwrap.fill(line, 118) if line else line for line in summary.splitlines()))
        progress.log("results: " + ", ".join(map(str, paths)))
    if failed:
        raise AblationFailed(
            f"{len(failed)} run(s) failed: "
            + "; ".join(f"{n} seed {s}: {type(e).__name__}: {e}" for n, s, e in failed)
            + ". Each run's train.log has the cause; once it is fixed (or, for an interruption such as a lost device, "
            "as is) the same command retries them and reuses the finished runs."
        )
    return rows


# Minutes per default run on a 2-core CPU: from an idle machine (the 7 variants of 0.2.0 in 13.5 minutes) to one
# shared with other jobs, where the slowest training steps (DiverseBranchBlock's, up to 2x the baseline's) take 5.
RUN_MINUTES = (1.9, 5)
HELP = """\
Train the baseline and module variants with identical settings and seeds; write a table and a plot.

Variants (positional; the first is the baseline): 'baseline' (-> <family><scale>.yaml), the slug of a shipped
model YAML, any model YAML path, or an Ultralytics built-in such as yolo11n.yaml. Default: the baseline and every
shipped YAML of the family (the control only when fine-tuning). Shipped slugs per --family:
{slugs}

Protocol: from scratch by default; --pretrained WEIGHTS (or pretrained=WEIGHTS) fine-tunes the baseline and every
variant from the same weights, each plug-in layer starting from the stock layer it replaces (converted, or
calibrated to it), with settings that keep the start ({finetune}), and adds the control variant (a plug-in that
computes exactly the stock layer) to the defaults. Fine-tuned with several seeds, each variant is compared with the
baseline seed by seed, and with the control.

Outputs in --out: results.csv (one row per run), results.md (per variant: mean ± std over seeds, which variants
differ from the baseline by more than their seed spread (fine-tuned: paired seed by seed, and against the control),
and whether each best.pt reproduces its in-training validation), results.png (mAP50-95 against CPU latency and
GFLOPs), and runs/<variant>/seed<k>/ with Ultralytics' files and train.log. Rerunning the same command reuses
finished runs (done.json) and redoes interrupted ones.

Time: one run at the defaults (shapes: 256 train / 64 val images, imgsz 160, 20 epochs, batch 16) takes about
{low_run} to {high_run} minutes on a 2-core CPU, depending on the CPU, the module (DiverseBranchBlock and DCNv2
train slowest) and other load, so the {n} default variants take about {low} to {high} minutes per seed. The console
shows each epoch and the time left, measured from the epochs and runs done so far. On a GPU (device=0) an epoch
takes seconds. The defaults suit short runs (AdamW lr0=0.003, lrf=0.2, one warm-up epoch, nbs=batch); for long runs
on real data pass e.g. data=coco128.yaml imgsz=640 epochs=100 optimizer=auto lrf=0.01 warmup_epochs=3 nbs=64,
ideally on a GPU.

Examples:
  convplug ablate                                # all variants on shapes, from scratch
  convplug ablate baseline saconv --seeds 0 1 2  # mean ± std over three seeds
  convplug ablate --pretrained runs/detect/train/weights/best.pt --seeds 0 1
  convplug ablate data=coco128.yaml epochs=100 imgsz=640 device=0 --out runs/ablate-coco
"""


def _changed(settings: dict, reference: dict) -> str:
    """``k=v`` for each setting that differs from ``reference``."""
    return " ".join(f"{k}={v}" for k, v in settings.items() if reference.get(k) != v)


def main(argv: list[str] | None = None) -> int:
    """``convplug ablate`` / ``scripts/ablate.py``: parse the command line, run :func:`ablate`; 0 when every run
    finished, 1 when some failed, 2 for bad arguments."""
    n = len(default_variants())
    shipped = "\n".join(f"  {f}: {', '.join(slugs(f))}" for f in families())
    p = argparse.ArgumentParser(
        prog="convplug ablate",
        description=HELP.format(slugs=shipped, n=n, low_run=RUN_MINUTES[0], high_run=RUN_MINUTES[1],
                                finetune=_changed(FINETUNE_DEFAULTS, TRAIN_DEFAULTS),
                                low=round(n * RUN_MINUTES[0]), high=round(n * RUN_MINUTES[1])),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "args",
        nargs="*",
        metavar="VARIANT | key=value",
        help="variants and Ultralytics train arguments; defaults: "
        + " ".join(f"{k}={v}" for k, v in TRAIN_DEFAULTS.items())
        + "; fine-tuning: "
        + _changed(FINETUNE_DEFAULTS, TRAIN_DEFAULTS),
    )
    p.add_argument(
        "--data", default=DEFAULT_DATA, help="'shapes' (default), a data YAML, or 'coco128' for COCO128 resolution"
    )
    p.add_argument(
        "--pretrained", metavar="WEIGHTS", help="fine-tune every variant and the baseline from these weights"
    )
    p.add_argument("--seeds", nargs="+", default=["0"], help="training seeds (several give mean ± std)")
    p.add_argument("--out", default="runs/ablate", help="output folder (default runs/ablate)")
    p.add_argument("--family", default=DEFAULT_FAMILY, choices=families(), help="model family (default yolov8)")
    p.add_argument("--scale", default="n", help="scale letter for the baseline and short variant names (default n)")
    p.add_argument("--latency-runs", type=int, default=50, help="timed forward passes per latency figure")
    p.add_argument("--latency-threads", type=int, default=1, help="torch threads for CPU latency (default 1)")
    p.add_argument("--verbose", action="store_true", help="show Ultralytics' output instead of writing train.log")
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="train the runs as Ray tasks, in parallel: alone, a local Ray with this machine's CPUs and GPUs; with "
        'an address (auto, ray://head:10001), on that cluster (needs pip install "yolo-convplug[ray]")',
    )
    p.add_argument("--cpus-per-run", type=float, help="CPUs of a Ray run (default: the CPUs / runs at once)")
    p.add_argument("--gpus-per-run", type=float, help="GPUs of a Ray run, 0.5 shares one (default 1 if any, else 0)")
    p.add_argument(
        "--keep-weights-on-worker", action="store_true", help="leave each Ray run's best.pt on its worker machine"
    )
    a = p.parse_intermixed_args(argv)
    if a.cpus_per_run is not None and not a.cpus_per_run > 0:
        print(f"ablate: error: --cpus-per-run {a.cpus_per_run:g}: give a number of CPUs above 0", file=sys.stderr)
        return 2
    if a.gpus_per_run is not None and not a.gpus_per_run >= 0:
        print(f"ablate: error: --gpus-per-run {a.gpus_per_run:g}: give 0 (CPU runs) or more", file=sys.stderr)
        return 2
    # `--seeds 0 1 epochs=10`: --seeds takes every word up to the next option; the words that are no seed go back
    seeds = [int(x) for x in a.seeds if x.lstrip("-").isdigit()]
    a.args += [x for x in a.seeds if not x.lstrip("-").isdigit()]
    try:
        kw = parse_overrides([x for x in a.args if "=" in x])
        data = kw.pop("data", a.data)
        seed = kw.pop("seed", None)
        if a.pretrained:
            kw["pretrained"] = a.pretrained
        ablate(
            [x for x in a.args if "=" not in x] or None,
            data=None if data == "coco128" else data,
            out=kw.pop("out", a.out),
            seeds=[seed] if isinstance(seed, int) else seeds,
            scale=a.scale,
            family=a.family,
            latency_runs=a.latency_runs,
            latency_threads=a.latency_threads,
            quiet=not a.verbose,
            ray=a.ray,
            cpus_per_run=a.cpus_per_run,
            gpus_per_run=a.gpus_per_run,
            keep_weights_on_worker=a.keep_weights_on_worker,
            **kw,
        )
    except RayUnavailable as e:
        print(e, file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"ablate: error: {e}", file=sys.stderr)
        return 2
    except AblationFailed as e:
        print(f"ablate: {e}", file=sys.stderr)
        return 1
    except AblationInterrupted as e:
        command = shlex.join(["convplug", "ablate", *(sys.argv[1:] if argv is None else argv)])
        print(f"\nablate: interrupted: {e}, kept in {e.out}; resume with: {command}", file=sys.stderr)
        return 130
    return 0
