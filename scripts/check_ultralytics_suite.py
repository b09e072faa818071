"""Run Ultralytics' own test suite with the plug-in on and off and fail on any difference.

Downloads the source distribution of the installed Ultralytics (``pip download --no-binary :all: --no-deps
ultralytics==<installed>``), unpacks its ``tests/`` and runs them twice with ``python -m pytest``: once with the
start-up hook active, once with ``YOLO_CONVPLUG_DISABLE=1``. Each mode runs in a fresh folder with its own
``YOLO_CONFIG_DIR``, ``YOLO_AUTOINSTALL=false`` and this venv's ``bin`` first on ``PATH``. Outcomes (passed, failed,
skipped, error) and exception types are compared per test id from pytest's JUnit XML; tests that need a download fail
or skip offline in both modes alike, which compares equal::

    python scripts/check_ultralytics_suite.py                      # the whole suite
    python scripts/check_ultralytics_suite.py --files test_cli.py test_python.py -k "not export"
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from importlib.metadata import version
from pathlib import Path

MODES = {"plug-in": {}, "stock": {"YOLO_CONVPLUG_DISABLE": "1"}}


def fetch_tests(ver: str, work: Path) -> Path:
    """Download and unpack the sdist of ``ultralytics==ver``; return its ``tests`` folder."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q", "-d",
                    str(work), f"ultralytics=={ver}"], check=True)
    sdist = next(work.glob("ultralytics-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if re.match(r"[^/]+/tests/", m.name)]
        tar.extractall(work, members=members)
    return next(work.glob("ultralytics-*/tests"))


def run_mode(mode: str, tests: Path, work: Path, files: list[str], keyword: str | None) -> tuple[dict, float, str]:
    """Run the suite in a fresh folder for ``mode``; return (test id -> (outcome, exception type), seconds, tail)."""
    folder = work / mode
    shutil.copytree(tests, folder / "tests")
    env = {k: v for k, v in os.environ.items() if k not in ("YOLO_CONVPLUG_DISABLE", "PYTHONPATH")}
    env.update(MODES[mode], YOLO_CONFIG_DIR=str(folder / "config"), YOLO_AUTOINSTALL="false")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    junit = folder / "junit.xml"
    targets = [f"tests/{f}" for f in files] or ["tests"]
    cmd = [sys.executable, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    cmd += ["-k", keyword] if keyword else []
    start = time.time()
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.time() - start
    if not junit.exists():
        output = proc.stdout[-3000:] + proc.stderr[-3000:]
        raise SystemExit(f"{mode}: pytest wrote no report (rc {proc.returncode}):\n{output}")
    return outcomes(junit), seconds, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """Test id -> (outcome, exception type) from a JUnit XML report."""
    out = {}
    for case in ET.parse(junit).iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome, exc = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                exc = (node.get("type") or "") if tag != "skipped" else ""
                if not exc and tag != "skipped":
                    exc = (node.get("message") or "").split(":")[0]
                break
        out[test_id] = (outcome, exc)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", nargs="*", default=[], help="test files of the suite (default: all), e.g. test_cli.py")
    ap.add_argument("-k", dest="keyword", help="pytest -k expression passed to both modes")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed afterwards)")
    args = ap.parse_args(argv)
    work = (args.work or Path(tempfile.mkdtemp(prefix="convplug-suite-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        ver = version("ultralytics")
        tests = fetch_tests(ver, work)
        results = {}
        for mode in MODES:
            results[mode], seconds, tail = run_mode(mode, tests, work, args.files, args.keyword)
            counts = {}
            for outcome, _ in results[mode].values():
                counts[outcome] = counts.get(outcome, 0) + 1
            print(f"ultralytics {ver} suite, {mode}: {len(results[mode])} tests {counts} in {seconds:.0f} s ({tail})",
                  flush=True)
        on, off = results["plug-in"], results["stock"]
        differ = sorted(t for t in on.keys() | off.keys() if on.get(t) != off.get(t))
        for t in differ:
            print(f"DIFFERS {t}: plug-in {on.get(t, 'not run')} stock {off.get(t, 'not run')}")
        print("same outcomes and exception types in both modes" if not differ else f"{len(differ)} test(s) differ")
        return 1 if differ else 0
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
