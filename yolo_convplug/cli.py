"""``convplug``: the command installed with yolo-convplug (``[project.scripts]``).

``convplug list`` shows every registered module and the shipped model YAMLs; ``convplug swap`` rewrites a model
YAML (:mod:`yolo_convplug.swap`); ``convplug ablate`` and ``convplug bench`` run the research tools
(:mod:`yolo_convplug.research`), which parse their own arguments, Ultralytics' ``key=value`` settings included.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from pathlib import Path

DELEGATED = {  # sub-command -> (module with main(argv) -> int, one-line description for `convplug --help`)
    "ablate": (
        "yolo_convplug.research.ablate",
        "train the baseline and module variants with identical settings and seeds; table and plot "
        "(minutes per run on a CPU; see convplug ablate --help)",
    ),
    "bench": (
        "yolo_convplug.research.bench",
        "per-module speed, params and FLOPs against the stock layer, side by side "
        "(minutes on a CPU; see convplug bench --help)",
    ),
}
ROLES = {
    "conv": "like Conv: the parser inserts c1 and width-scales c2",
    "repeat": "like C2f: the parser inserts c1 and the depth-scaled n, and width-scales c2",
    "keep": "the parser inserts c1; the output keeps c1 channels",
}
SWAP_EPILOG = """\
examples:
  convplug swap yolo26.yaml Conv=SAConv2d --scope strided        # writes yolo26n-saconv2d.yaml
  convplug swap yolo11s.yaml C3k2=C2f_Faster --scope backbone     # writes yolo11s-c2f_faster.yaml
  convplug swap my_model.yaml Conv=DSConv2d --scope 1,3,5-7 -o yolov8m-mine.yaml

A swap stays within a role (conv rows [c2, k, s, ...] or C2f-like repeat rows: see convplug list); a swap that cannot
build is refused naming the layer. Ultralytics reads the scale from the file name (yolov8n-x.yaml builds scale n),
so the default output name carries the verified scale; then: yolo train model=yolo26n-saconv2d.yaml data=...

Time: a few seconds on a CPU (builds the source and the swapped model once and runs one forward pass each)."""


def _signature(cls: type, role: str) -> str:
    from .registry import yaml_parameters

    params = yaml_parameters(cls, role)
    if params is None:
        return "?"
    return "[" + ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params) + "]"


def _list(args) -> int:
    import yaml

    import yolo_convplug  # noqa: F401  (importing registers the built-in modules)

    from .plugins import load_user_modules
    from .registry import registered
    from .resolve import shipped_yamls

    load_user_modules()
    entries = registered()
    print("Registered modules: YAML name, parser role, paper; then the YAML args (after what the parser inserts)")
    for role, text in ROLES.items():
        print(f"  role {role:<6} {text}")
    for name, e in entries.items():
        print(f"\n  {name:<12} {e.role:<6}  {e.paper or 'no paper given'}")
        args = textwrap.wrap(_signature(e.cls, e.role), 96, break_long_words=False)
        print("\n".join(f"  {'':<12} {'args' if j == 0 else '':<6}  {line}" for j, line in enumerate(args)))
    print("\nShipped model YAMLs (build by name from any folder, with a scale letter: yolov8n-saconv.yaml):")
    for path in shipped_yamls():
        d = yaml.safe_load(path.read_text())
        layers = (d.get("backbone") or []) + (d.get("head") or [])
        used = sorted({r[2] for r in layers} & set(entries))
        print(f"  {path.name:<26} scales {'/'.join(d.get('scales') or {}) or '-':<10} {', '.join(used)}")
    return 0


def _swap(args) -> int:
    from ultralytics.nn.tasks import guess_model_scale

    from .swap import SwapError, default_output, load_model_yaml, scaled_name, shadowed_yaml, swap_yaml

    try:
        d, src_scale = load_model_yaml(args.source)
        scale = args.scale or src_scale or next(iter(d.get("scales") or {"": 0}))
        out = args.out or default_output(args.source, args.rules, scale)
        path = swap_yaml(args.source, args.rules, scope=args.scope, out=out, scale=scale)
    except SwapError as e:
        print(f"swap refused: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    hidden = shadowed_yaml(path)
    if hidden is not None:
        print(f"warning: from {path.parent}, the name {path.name} now builds this file instead of the shipped "
              f"{hidden.name}; rename it (e.g. -o {path.stem}-swap.yaml) to keep both reachable", file=sys.stderr)
    if d.get("scales") and guess_model_scale(path) != scale:
        example = f"{scaled_name(Path(str(args.source)).stem, scale) or 'yolov8' + scale}-{path.stem}.yaml"
        print(
            f"note: Ultralytics reads the scale from the file name and {path.name} carries none, so it will warn "
            f"'no model scale passed' and build scale {next(iter(d['scales']))!r}; name the file like {example} "
            f"(Ultralytics' rule: yolo<version><scale>...) to build scale {scale!r}",
            file=sys.stderr,
        )
    return 0


def _list_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convplug list",
        description="List every registered module with its parser role, its YAML arguments and its paper, then the "
        "model YAMLs shipped with the package. Includes your own modules (entry points of group "
        "yolo_convplug.modules and $YOLO_CONVPLUG_MODULES). Time: about a second (imports torch and Ultralytics).",
    )
    p.set_defaults(run=_list)
    return p


def _swap_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convplug swap",
        description="Swap modules in a model YAML (a file, an Ultralytics built-in such as yolov8.yaml or "
        "yolo26s.yaml, or a shipped name), keeping every layer index, so pretrained= still transfers every untouched "
        "layer; the result is built as Ultralytics builds it and run before it is written.",
        epilog=SWAP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="model YAML file or name (yolov8.yaml, yolo11n.yaml, yolo26.yaml, ...)")
    p.add_argument("rules", nargs="+", metavar="OLD=NEW", help="module swaps, e.g. Conv=SAConv2d C2f=C2f_Faster")
    p.add_argument("--scope", default="all", help="all (default), backbone, head, strided, or indices like 1,3,5-7")
    p.add_argument("-o", "--out", help="output YAML (default: <source><scale>-<new modules>.yaml in this folder)")
    p.add_argument("--scale", help="scale letter to verify at and to name the output by (default: the source's, else "
                   "its first)")
    p.set_defaults(run=_swap)
    return p


COMMANDS = {  # sub-command -> parser of its arguments, one-line description
    "list": (_list_parser, "registered modules (role, YAML args, paper) and the shipped model YAMLs (a second)"),
    "swap": (_swap_parser, "swap modules in any model YAML, keeping every layer index; verified by building it "
                           "(seconds)"),
    **{name: (None, text) for name, (_, text) in DELEGATED.items()},
}


def main(argv: list[str] | None = None) -> int:
    """Run ``convplug`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:  # ablate/bench parse their own arguments, key=value settings included
        return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])
    if argv and argv[0] in COMMANDS:
        args = COMMANDS[argv[0]][0]().parse_intermixed_args(argv[1:])
        return args.run(args)
    p = argparse.ArgumentParser(
        prog="convplug",
        description="yolo-convplug: published convolution modules as plug-ins for Ultralytics YOLO.",
        epilog="commands:\n" + "".join(f"  {k:<8} {text}\n" for k, (_, text) in COMMANDS.items())
        + "\n'convplug COMMAND --help' says more about each.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", choices=list(COMMANDS), help="see below")
    p.parse_args(argv)  # only reached without a valid command: prints the help or the error and exits
    return 2


if __name__ == "__main__":
    sys.exit(main())
