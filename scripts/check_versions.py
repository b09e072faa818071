"""Run the integration tests against several Ultralytics releases, each in a throwaway venv.

For every version: ``python -m venv``, one ``pip install`` of the torch spec, this repository with its ``dev`` extra
(editable, so the tests exercise the working tree; pytest, onnx, onnxruntime) and ``ultralytics==VERSION``, then
``python -m pytest TESTS -q`` from the repository root. Prints a markdown compatibility table (the README's table
comes from it)::

    python scripts/check_versions.py                                  # 8.3.0, 8.3.100, newest 8.4
    python scripts/check_versions.py --versions 8.3.0 latest --tests tests/test_integration.py tests/test_deploy.py
    python scripts/check_versions.py --venv-root runs/venvs --keep    # keep (and reuse) the venvs

The oldest version also runs Ultralytics' own test suite with the plug-in on and off
(``scripts/check_ultralytics_suite.py``; ``--suite-files test_cli.py ...`` for a subset, ``--no-suite`` to skip).

``latest`` is the newest release inside the supported range, as ``pip index versions ultralytics`` lists them.
Each venv gets its own ``YOLO_CONFIG_DIR`` so an old release never rewrites the user's Ultralytics settings.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _compat():
    """``yolo_convplug/ultralytics_compat.py`` loaded by path: the package root would import Ultralytics and torch,
    which the Python running this script need not have."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_convplug_compat", ROOT / "yolo_convplug" / "ultralytics_compat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMPAT = _compat()

DEFAULT_VERSIONS = ("8.3.0", "8.3.100", "latest")
DEFAULT_TORCH = "torch==2.14.1 torchvision==0.29.1"

def latest_supported(python: str = sys.executable) -> str:
    """The newest Ultralytics release whose major.minor is in the supported range."""
    out = subprocess.run(
        [python, "-m", "pip", "index", "versions", "ultralytics"], capture_output=True, text=True, check=True
    ).stdout
    listed = re.search(r"Available versions:\s*(.+)", out)
    if not listed:
        raise SystemExit(f"could not read `pip index versions ultralytics` output:\n{out}")
    versions = [v.strip() for v in listed.group(1).split(",") if re.fullmatch(r"\d+\.\d+\.\d+", v.strip())]
    supported = [v for v in versions if COMPAT.in_supported_range(v)]
    return max(supported, key=COMPAT.parse_version)


def _run(cmd: list[str], log, **kwargs) -> int:
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, **kwargs).returncode


def make_venv(venv: Path, version: str, torch_spec: str, log, extra: tuple[str, ...] = ()) -> str | None:
    """Create ``venv`` (or reuse it) and install the torch spec, this repository with its ``dev`` extra (pytest,
    onnx, onnxruntime, onnxslim) and ``ultralytics==version``; return an error message or None."""
    python = venv / "bin" / "python"
    install = [str(python), "-m", "pip", "install", *torch_spec.split(), "-e", f"{ROOT}[dev]"]
    install += [f"ultralytics=={version}", *extra]
    marker = venv / f".installed-{hashlib.sha1(' '.join(install[3:]).encode()).hexdigest()[:12]}"
    if marker.exists():
        log.write(f"reusing {venv}\n")
        return None
    if not python.exists() and _run([sys.executable, "-m", "venv", str(venv)], log):
        return "python -m venv failed"
    if _run(install, log):
        return "pip install failed"
    marker.touch()
    return None


def _summary(output: str) -> dict[str, int]:
    """Counts from pytest's closing line, e.g. '3 failed, 25 passed, 1 skipped in 40.1s'."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    if lines:
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?)", lines[-1]):
            counts["error" if what.startswith("error") else what] += int(n)
    return counts


def check(version: str, venv_root: Path, torch_spec: str, tests: list[str], log_dir: Path, extra=(),
          suite: list[str] | None = None) -> dict:
    """Install ``version`` in its venv and run ``tests``; with ``suite`` (file names, empty = all) also Ultralytics'
    own test suite with the plug-in on and off (``scripts/check_ultralytics_suite.py``), which must agree."""
    venv = venv_root / f"ultralytics-{version}"
    log_path = log_dir / f"ultralytics-{version}.log"
    start = time.time()
    with open(log_path, "w") as log:
        error = make_venv(venv, version, torch_spec, log, tuple(extra))
        install_s = time.time() - start
        row = {"version": version, "log": log_path, "install_s": install_s, "counts": {}, "result": error or ""}
        if error:
            return row
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["YOLO_CONFIG_DIR"] = str(venv / "ultralytics-config")  # keep the user's settings.json untouched
        cmd = [str(venv / "bin" / "python"), "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", "-rfE"]

        def logged_run(command: list[str], seconds_key: str) -> subprocess.CompletedProcess:
            """Run ``command`` in the venv's environment, its command line and output in the log, its time in row."""
            log.write(f"\n$ {' '.join(command)}\n")
            log.flush()
            t0 = time.time()
            result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
            row[seconds_key] = time.time() - t0
            log.write(result.stdout + result.stderr)
            return result

        proc = logged_run(cmd, "test_s")
        if suite is not None:
            guard = [str(venv / "bin" / "python"), str(ROOT / "scripts" / "check_ultralytics_suite.py")]
            guard += ["--files", *suite] if suite else []
            suite_proc = logged_run(guard, "suite_s")
            row["suite"] = suite_proc.stdout.strip().splitlines()[-1:] or ["no output"]
    row["counts"] = _summary(proc.stdout)
    row["rc"] = proc.returncode
    row["result"] = "pass" if proc.returncode == 0 and (suite is None or suite_proc.returncode == 0) else "FAIL"
    row["failures"] = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return row


def table(rows: list[dict], torch_spec: str, python: str, tests: list[str]) -> str:
    head = (
        f"Python {python}, {torch_spec}; {' '.join(tests)}\n\n"
        "| Ultralytics | result | passed | failed | skipped | errors | test seconds |\n"
        "|---|---|---|---|---|---|---|"
    )
    body = []
    for r in rows:
        c = r["counts"]
        seconds = f"{r['test_s']:.0f}" if "test_s" in r else "-"
        body.append(
            f"| {r['version']} | {r['result']} | {c.get('passed', '-')} | {c.get('failed', '-')} | "
            f"{c.get('skipped', '-')} | {c.get('error', '-')} | {seconds} |"
        )
    return "\n".join([head, *body])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--versions", nargs="+", default=list(DEFAULT_VERSIONS), help="'latest' = newest supported")
    ap.add_argument("--tests", nargs="+", default=["tests/test_integration.py"], help="pytest paths (repo root)")
    ap.add_argument("--torch-spec", default=DEFAULT_TORCH, help=f"pip requirements for torch ({DEFAULT_TORCH!r})")
    ap.add_argument("--pip-extra", nargs="*", default=[], help="more requirements, e.g. onnxscript")
    ap.add_argument("--venv-root", type=Path, help="where the venvs go (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the venvs; a run with the same --venv-root reuses them")
    ap.add_argument("--suite-files", nargs="*", default=[], help="files of Ultralytics' own suite for the guard run "
                    "on the oldest version (default: all)")
    ap.add_argument("--no-suite", action="store_true", help="skip the guard run of Ultralytics' own suite")
    ap.add_argument("--log-dir", type=Path, default=ROOT / "runs" / "check_versions", help="one log per version")
    args = ap.parse_args(argv)

    versions = [latest_supported() if v == "latest" else v for v in args.versions]
    oldest = min(versions, key=COMPAT.parse_version)
    venv_root = (args.venv_root or Path(tempfile.mkdtemp(prefix="convplug-versions-"))).resolve()
    venv_root.mkdir(parents=True, exist_ok=True)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for version in versions:
            log = args.log_dir / f"ultralytics-{version}.log"
            print(f"ultralytics {version}: venv under {venv_root}, log {log}", flush=True)
            suite = None if args.no_suite or version != oldest else args.suite_files
            row = check(version, venv_root, args.torch_spec, args.tests, args.log_dir, args.pip_extra, suite)
            rows.append(row)
            print(f"  {row['result']} {row['counts']} (install {row['install_s']:.0f} s)", flush=True)
            if "suite" in row:
                print(f"  Ultralytics' own suite, plug-in vs stock ({row['suite_s']:.0f} s): {row['suite'][0]}")
            for line in row.get("failures", []):
                print(f"    {line}", flush=True)
            if not args.keep:
                shutil.rmtree(venv_root / f"ultralytics-{version}", ignore_errors=True)
    finally:
        if not args.keep and args.venv_root is None:
            shutil.rmtree(venv_root, ignore_errors=True)
    print()
    setup = " ".join([args.torch_spec, *args.pip_extra])
    print(table(rows, setup, ".".join(map(str, sys.version_info[:2])), args.tests))
    return 0 if all(r["result"] == "pass" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
