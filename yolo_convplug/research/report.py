"""The ablation's report: ``results.csv`` (one row per run), ``results.md`` (per variant), ``results.png`` and the
console summary.

Per variant it gives the mean ± sample std over seeds of every metric and the ratio of its mAP50-95 to the
baseline's (the first variant). With several seeds, from scratch, a variant is *beyond spread* when ``|mean_v -
mean_b| > std_v + std_b`` for mAP50-95 (v the variant, b the baseline): its difference from the baseline is larger
than the seed-to-seed spread of either. Fine-tuned, a seed gives every variant the same data order and the same
start of the shared layers, so the comparison is paired: ``d_k = mAP_v(seed k) - mAP_b(seed k)``, beyond spread when
``|mean(d)| > std(d)``, and, when the table holds the control (the ``control`` variant: a plug-in that computes
exactly the stock layer through the same warm-start path), *beyond control* when ``|mean(d)| - std(d) > |mean(d_c)|
+ std(d_c)``: the two bands do not overlap, so the difference is larger than the protocol's own bias. With one seed
the report says that differences below the seed spread of the protocol are not evidence, and gives that spread where
it was measured.

The checkpoint check compares each run's final validation of ``best.pt`` with the validation of the same epoch
during training (the row of that epoch in Ultralytics' ``results.csv``); a relative gap above ``GUARD_REL`` means the
saved checkpoint does not reproduce the model that was validated (as when float16 saving overflows a statistic).
"""

from __future__ import annotations

import csv
import math
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

from .variants import CONTROL, short_label

METRICS = ("params", "gflops", "latency_cpu_ms", "latency_gpu_ms", "train_s", "mAP50", "mAP50-95", "mAP50-95_train")
CSV_FIELDS = ("variant", "model", "seed", "best_epoch", *METRICS, "transferred", "latency_shared")
GUARD_REL = 0.02  # relative gap between best.pt's final validation and its epoch's in-training validation
GUARD_ABS = 0.001  # gaps that the 3-decimal tables cannot show are not flagged
START_KEPT = 0.05  # fine-tuning keeps the start when the baseline's first epoch is at most this far below it
SHARED = " (shared)"  # the mark of a latency measured while other runs trained on the same node


@dataclass(frozen=True)
class Protocol:
    """What an ablation ran: the data as the user named it, epochs, image size, seeds, and the weights every run was
    fine-tuned from (None: from scratch). ``same_images``: the data validates on training images (None: unknown).
    ``seed_spread``: the measured std of mAP50-95 over seeds for this protocol (None: not measured). Fine-tuned:
    ``start_map``, the weights' own mAP50-95 before training, and ``first_epochs``, (seed, mAP50-95) of the
    baseline's first epoch: whether the protocol keeps the start."""

    data: str
    epochs: int
    imgsz: int
    seeds: tuple[int, ...]
    pretrained: str | None = None
    same_images: bool | None = None
    seed_spread: float | None = None
    start_map: float | None = None
    first_epochs: tuple[tuple[int, float], ...] = ()

    @property
    def start(self) -> str:
        return f"fine-tuned from {Path(self.pretrained).name}" if self.pretrained else "from scratch"

    def title(self) -> str:
        epochs = f"{self.epochs} epoch" + ("s" if self.epochs != 1 else "")
        seeds = ("seeds " if len(self.seeds) > 1 else "seed ") + ", ".join(map(str, self.seeds))
        return f"{self.data}, {epochs}, imgsz {self.imgsz}, {seeds}, {self.start}"


def checkpoint_gap(final: float, in_training: float) -> tuple[float, bool]:
    """(relative gap ``final / in_training - 1``, whether it is flagged) for the mAP50-95 of ``best.pt`` in the final
    validation and of its epoch during training; (NaN, False) when the in-training value is unknown."""
    if math.isnan(in_training) or math.isnan(final):
        return math.nan, False
    diff = final - in_training
    rel = diff / in_training if in_training > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    return rel, abs(diff) > GUARD_ABS and abs(rel) > GUARD_REL


def _value(row: dict, key: str) -> float:
    v = row.get(key, math.nan)
    return math.nan if v in (None, "") else float(v)


def summarize(rows: list[dict]) -> list[dict]:
    """Per variant (in first-seen order): ``n`` runs, (mean, std) of each metric over seeds (std 0 for one run),
    the largest checkpoint gap ``gap`` and whether any run is flagged (``gap_flag``)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["variant"], []).append(r)
    out = []
    for name, rs in groups.items():
        s = {"variant": name, "n": len(rs)}
        for k in METRICS:
            vals = [_value(r, k) for r in rs]
            if any(math.isnan(v) for v in vals):  # e.g. no GPU latency
                s[k] = (math.nan, math.nan)
            else:
                s[k] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        gaps = [checkpoint_gap(_value(r, "mAP50-95"), _value(r, "mAP50-95_train")) for r in rs]
        known = [g for g in gaps if not math.isnan(g[0])]
        s["gap"] = max((g[0] for g in known), key=abs) if known else math.nan
        s["gap_flag"] = any(flag for _, flag in gaps)
        s["per_seed"] = {int(r["seed"]): _value(r, "mAP50-95") for r in rs}
        s["latency_shared"] = any(r.get("latency_shared") is True for r in rs)
        out.append(s)
    return out


def beyond_spread(s: dict, base: dict) -> bool | None:
    """Whether ``|mean_v - mean_b| > std_v + std_b`` for mAP50-95; None unless both have several seeds."""
    if s["n"] < 2 or base["n"] < 2:
        return None
    (mv, sv), (mb, sb) = s["mAP50-95"], base["mAP50-95"]
    return abs(mv - mb) > sv + sb


def paired_difference(s: dict, base: dict) -> tuple[float, float] | None:
    """(mean, sample std) over the seeds both ran of ``mAP50-95(variant, seed) - mAP50-95(baseline, seed)``; None
    with fewer than two common seeds."""
    common = sorted(set(s["per_seed"]) & set(base["per_seed"]))
    if len(common) < 2:
        return None
    d = [s["per_seed"][k] - base["per_seed"][k] for k in common]
    return statistics.fmean(d), statistics.stdev(d)


def control_of(summary: list[dict]) -> dict | None:
    """The control variant of the table (short label ``control``), if any."""
    base = summary[0]["variant"]
    return next((s for s in summary[1:] if short_label(s["variant"], base) == CONTROL), None)


def comparison(s: dict, summary: list[dict], protocol: Protocol) -> dict:
    """How variant ``s`` compares with the baseline: ``diff`` (the paired difference's mean ± std, fine-tuned),
    ``spread`` (beyond spread, see the module docstring) and ``control`` (beyond control); None where it does not
    apply (the baseline, one seed, no control in the table)."""
    base, control = summary[0], control_of(summary)
    if s is base:
        return {"diff": None, "spread": None, "control": None}
    if not protocol.pretrained:
        return {"diff": None, "spread": beyond_spread(s, base), "control": None}
    d = paired_difference(s, base)
    dc = paired_difference(control, base) if control is not None and control is not s else None
    return {
        "diff": d,
        "spread": None if d is None else abs(d[0]) > d[1],
        "control": None if d is None or dc is None else abs(d[0]) - d[1] > abs(dc[0]) + dc[1],
    }


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _diff(d: tuple[float, float] | None) -> str:
    return "-" if d is None else f"{d[0]:+.3f} ± {d[1]:.3f}"


def _fmt(mean_std: tuple[float, float], digits: int, n: int) -> str:
    mean, std = mean_std
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _ratio(s: dict, base: dict) -> str:
    b = base["mAP50-95"][0]
    return f"{s['mAP50-95'][0] / b:.2f}x" if b > 0 else "-"


def _gap(s: dict) -> str:
    if math.isnan(s["gap"]):
        return "-"
    return f"{s['gap']:+.1%} " + ("MISMATCH" if s["gap_flag"] else "ok")


def notes(summary: list[dict], protocol: Protocol) -> list[str]:
    """The sentences that say how to read the numbers: protocol, data, noise, and flagged checkpoints."""
    out = [f"Protocol: {protocol.title()}." + (f" Weights: {protocol.pretrained}." if protocol.pretrained else "")]
    if protocol.start_map is not None and protocol.first_epochs:
        worst = min(m for _, m in protocol.first_epochs) / protocol.start_map if protocol.start_map > 0 else 1.0
        epochs = ", ".join(f"{m:.3f}" for _, m in protocol.first_epochs)
        seeds = ", ".join(str(k) for k, _ in protocol.first_epochs)
        kept = (
            f"within {START_KEPT:.0%}: the protocol keeps the start"
            if worst >= 1 - START_KEPT
            else f"more than {START_KEPT:.0%} below it: these settings wipe part of the start; lower lr0 or add a "
            "warm-up (key=value)"
        )
        out.append(
            f"Start: the weights validate at {protocol.start_map:.3f} mAP50-95 before any training; the baseline's "
            f"first epoch gives {epochs} (seed {seeds}), {kept}."
        )
    if protocol.same_images:
        out.append(
            f"{protocol.data} validates on its training images: these numbers measure how well each model fits "
            "those images, not how it generalises to new ones."
        )
    if any(s["n"] > 1 for s in summary) and protocol.pretrained:
        out.append(
            "Paired: per seed, the variant's mAP50-95 minus the baseline's with the same seed (the same data order "
            "and start of the shared layers); beyond spread: |mean| > std of those differences."
        )
        control = control_of(summary)
        out.append(
            f"Beyond control: |mean| - std of the paired differences > |mean| + std of the control's; "
            f"{control['variant']} "
            "goes through the same warm start but computes exactly the stock layer, so its difference is the "
            "protocol's own bias. A difference is evidence only where both say yes."
            if control is not None
            else "No control in this table (add the 'control' variant): the protocol's own bias is not measured."
        )
    elif any(s["n"] > 1 for s in summary):
        out.append(
            "Beyond spread: |mean - baseline mean| > std + baseline std of mAP50-95 over seeds; a difference "
            "inside that band is not evidence."
        )
    else:
        spread = (
            f"this protocol's seed spread (std of mAP50-95 over seeds, pooled over the default variants) is "
            f"{protocol.seed_spread:.3f}"
            if protocol.seed_spread is not None
            else "the seed spread of this protocol is not measured: rerun with --seeds 0 1 2 to see it"
        )
        out.append(f"One seed: a difference from the baseline smaller than the seed spread is not evidence; {spread}.")
    flagged = [s["variant"] for s in summary if s["gap_flag"]]
    if flagged:
        out.append(
            f"MISMATCH ({', '.join(flagged)}): the final validation of best.pt differs by more than "
            f"{GUARD_REL:.0%} from the validation of the same epoch during training; the saved checkpoint does not "
            "reproduce the trained model (look for float16 overflow in its saved statistics)."
        )
    return out


def warm_start_lines(rows: list[dict]) -> list[str]:
    """Per variant (its first run; every seed loads the same weights the same way): how many of its tensors took the
    pretrained values (Ultralytics' ``N/M``) and what the warm start did with each plug-in layer."""
    out, seen = [], set()
    for r in rows:
        if r["variant"] in seen or not r.get("transferred"):
            continue
        seen.add(r["variant"])
        layers = r.get("warm_start") or []
        out.append(f"- {r['variant']}: {r['transferred']} tensors transferred" + (":" if layers else ""))
        out += [f"  - {line}" for line in layers]
    return out


def markdown(
    summary: list[dict], protocol: Protocol, settings: dict | None = None, latency_threads: int = 1,
    warm_start: list[str] = (),
) -> str:  # fmt: skip
    """``results.md``: the per-variant table, the notes and, when fine-tuned, what each run's warm start loaded."""
    base = summary[0]
    cols = _comparison_columns(summary, protocol)
    head = [
        "variant", "runs", "params (M)", "GFLOPs", "CPU latency (ms)", "GPU latency (ms)", "train time (s)", "mAP50",
        "mAP50-95", "mAP50-95 vs baseline", *cols, "best.pt vs in-training",
    ]  # fmt: skip
    lines = [f"# Ablation: {protocol.title()}", "", "| " + " | ".join(head) + " |"]
    lines.append("|---|" + "---:|" * (len(head) - 1))
    for s in summary:
        n = s["n"]
        cells = [
            s["variant"], str(n), f"{s['params'][0] / 1e6:.3f}", f"{s['gflops'][0]:.3f}",
            _fmt(s["latency_cpu_ms"], 2, n) + SHARED * s["latency_shared"],
            _fmt(s["latency_gpu_ms"], 2, n) + SHARED * s["latency_shared"],
            _fmt(s["train_s"], 0, n) + SHARED * s["latency_shared"],
            _fmt(s["mAP50"], 3, n), _fmt(s["mAP50-95"], 3, n), _ratio(s, base),
        ]  # fmt: skip
        cells += _comparison_cells(s, summary, protocol, cols)
        cells.append(_gap(s))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *notes(summary, protocol)]
    if any(s["latency_shared"] for s in summary):
        lines.append(
            f"{SHARED.strip()} Latency and train time measured on a node shared with other runs of this ablation "
            "(Ray, several runs at once): inflated and noisy; compare modules' speed with `convplug bench` on an "
            "idle machine."
        )
    lines.append(
        f"Baseline: {base['variant']}. Values are mean ± std over seeds where a variant has several runs. "
        "Latency: fused model, batch 1, fp32, median of timed passes after warm-up; "
        f"CPU with {latency_threads} torch thread(s) on {platform.processor() or platform.machine()} "
        f"({os.cpu_count()} cores); GPU where CUDA is available. GFLOPs: torch.utils.flop_counter on the fused model, "
        "batch 1, training imgsz. best.pt vs in-training: final validation of best.pt against the validation of its "
        "epoch during training."
    )
    if warm_start:
        lines += ["", "Warm start from the pretrained weights (per variant):", *warm_start, ""]
    if settings:
        lines.append("Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return "\n".join(lines) + "\n"


def _comparison_columns(summary: list[dict], protocol: Protocol) -> list[str]:
    """The comparison columns of the tables: none with one seed; beyond spread; fine-tuned, the paired difference
    first and beyond control when the table holds the control."""
    if not any(s["n"] > 1 for s in summary):
        return []
    if not protocol.pretrained:
        return ["beyond spread"]
    return ["paired diff", "beyond spread", *(["beyond control"] if control_of(summary) else [])]


def _comparison_cells(s: dict, summary: list[dict], protocol: Protocol, cols: list[str]) -> list[str]:
    c = comparison(s, summary, protocol)
    cell = {"paired diff": _diff(c["diff"]), "beyond spread": _yes_no(c["spread"]),
            "beyond control": _yes_no(c["control"])}  # fmt: skip
    return [cell[k] for k in cols]


def console_summary(summary: list[dict], protocol: Protocol) -> str:
    """A compact table of mAP50-95 per variant and the notes, for the end of an ablation."""
    base = summary[0]
    cols = _comparison_columns(summary, protocol)
    width = max(len(s["variant"]) for s in summary) + 2
    widths = {"paired diff": 17, "beyond spread": 15, "beyond control": 16}
    lines = [
        f"{'variant':<{width}}{'mAP50-95':<16}{'vs baseline':<13}"
        + "".join(f"{k:<{widths[k]}}" for k in cols)
        + "best.pt vs in-training"
    ]
    for s in summary:
        line = f"{s['variant']:<{width}}{_fmt(s['mAP50-95'], 3, s['n']):<16}{_ratio(s, base):<13}"
        line += "".join(f"{c:<{widths[k]}}" for k, c in zip(cols, _comparison_cells(s, summary, protocol, cols)))
        lines.append(line + _gap(s))
    return "\n".join(lines + ["", *notes(summary, protocol)])


def write_results(
    rows: list[dict], out: Path, protocol: Protocol, settings: dict | None = None, latency_threads: int = 1
) -> tuple[Path, Path, Path]:
    """Write ``results.csv``, ``results.md`` and ``results.png`` into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = out / "results.csv", out / "results.md", out / "results.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows({k: r.get(k, math.nan) for k in CSV_FIELDS} for r in rows)
    summary = summarize(rows)
    md_path.write_text(markdown(summary, protocol, settings, latency_threads, warm_start_lines(rows)))
    plot_results(summary, png_path, protocol)
    return csv_path, md_path, png_path


# Label offsets (points) tried in turn around a point until the label overlaps no other label or marker and stays
# inside the axes: right, left, then further above and below.
_OFFSETS = [(6, 3), (-6, 3), (6, -11), (-6, -11), (6, 13), (-6, 13), (6, -21), (-6, -21), (6, 23), (-6, 23)]


def _place_labels(fig, ax, labels: list, points: list) -> None:
    """Move each annotation of ``labels`` to the first offset of ``_OFFSETS`` at which it overlaps neither an earlier
    label nor any point (display boxes ``points``) and stays inside the axes."""
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    placed = list(points)

    def move(ann, dx: float, dy: float):
        ann.xyann = (dx, dy)
        ann.set_horizontalalignment("left" if dx > 0 else "right")
        return ann.get_window_extent(renderer)

    for ann in labels:
        for offset in _OFFSETS:
            box = move(ann, *offset)
            fits = inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
            if fits and not any(box.overlaps(p) for p in placed):
                break
        else:  # nowhere free: the default place
            box = move(ann, *_OFFSETS[0])
        placed.append(box)


def plot_results(summary: list[dict], path: Path, protocol: Protocol) -> Path:
    """mAP50-95 against CPU latency and against GFLOPs: the baseline as dashed reference lines, every point labelled
    with its module and its mAP50-95 change against the baseline; std error bars with several seeds, and with one
    seed the protocol's measured seed spread as a band around the baseline (a single-seed point inside it says
    nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import Bbox

    base = summary[0]
    single = all(s["n"] == 1 for s in summary)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.11, top=0.84, wspace=0.18)  # fixed: labels are placed once
    panels = (("latency_cpu_ms", "CPU latency, batch 1 (ms)", "accuracy vs CPU latency"), ("gflops", "GFLOPs",
              "accuracy vs compute"))  # fmt: skip
    for ax, (key, xlabel, title) in zip(axes, panels):
        bx, by = base[key][0], base["mAP50-95"][0]
        ax.axhline(by, color="0.5", ls="--", lw=0.8, zorder=0)
        if single and protocol.seed_spread is not None:  # one seed: the protocol's known spread around the baseline
            ax.axhspan(by - protocol.seed_spread, by + protocol.seed_spread, color="0.5", alpha=0.15, lw=0, zorder=0,
                       label=f"baseline ± seed spread ({protocol.seed_spread:.3f})")  # fmt: skip
            ax.legend(loc="lower right", fontsize=8)
        ax.axvline(bx, color="0.5", ls="--", lw=0.8, zorder=0)
        labels = []
        for i, s in enumerate(summary):
            (x, xe), (y, ye) = s[key], s["mAP50-95"]
            ax.errorbar(x, y, xerr=xe or None, yerr=ye or None, fmt="o", color=f"C{i}", capsize=3, ms=6)
            if s is base:
                text = f"{s['variant']} (baseline)"
            else:
                change = f"{y / by - 1:+.1%}" if by > 0 else ""
                text = f"{short_label(s['variant'], base['variant'])} {change}"
            box = dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.85)  # legible over error bars
            labels.append(
                ax.annotate(text, (x, y), textcoords="offset points", xytext=_OFFSETS[0], fontsize=9, color=f"C{i}",
                            va="bottom", zorder=5, bbox=box)  # fmt: skip
            )
        ax.margins(x=0.25, y=0.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mAP50-95")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        fig.canvas.draw()
        points = [
            Bbox.from_extents(px - 5, py - 5, px + 5, py + 5)
            for px, py in ax.transData.transform([(s[key][0], s["mAP50-95"][0]) for s in summary])
        ]
        _place_labels(fig, ax, labels, points)
    title = f"{protocol.title()}: mAP50-95 change against {base['variant']}"
    if single:
        spread = "band: the protocol's seed spread" if protocol.seed_spread is not None else "seed spread not measured"
        title += f"\n1 seed: differences inside the seed spread are not evidence ({spread})"
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
