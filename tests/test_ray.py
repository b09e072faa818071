"""The ablation on Ray: the same rows as in-process, a killed worker's run retried, and one-line errors when Ray is
missing or its address does not answer. A local Ray of 2 CPUs; tiny shapes runs (imgsz 64, 1 epoch)."""

import csv
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from yolo_convplug.research import ablate as ablate_mod  # noqa: E402
from yolo_convplug.research.ablate import ablate  # noqa: E402

TINY = "shapes:train=16,val=8,imgsz=64"
KW = dict(data=TINY, epochs=1, imgsz=64, batch=8, workers=0, latency_runs=3)
SAME = ("variant", "seed", "params", "gflops", "mAP50", "mAP50-95", "mAP50-95_train", "best_epoch")


@pytest.fixture
def local_ray(tmp_path, monkeypatch):
    """A local Ray of 2 CPUs whose workers share this test's data cache and train under tmp_path/worker."""
    monkeypatch.setenv("CONVPLUG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CONVPLUG_RAY_WORKDIR", str(tmp_path / "worker"))
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield tmp_path / "worker"
    ray.shutdown()


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _weights(path):
    from ultralytics import YOLO

    return YOLO(str(path)).model.state_dict()


def test_ray_ablation_gives_the_in_process_rows(tmp_path, local_ray, capsys):
    local = ablate(["baseline", "saconv"], out=tmp_path / "local", **KW)
    capsys.readouterr()
    rows = ablate(["baseline", "saconv"], out=tmp_path / "ray", ray="local", cpus_per_run=1, **KW)
    assert [{k: r[k] for k in SAME} for r in rows] == [{k: r[k] for k in SAME} for r in local]
    for v in ("yolov8n", "yolov8n-saconv"):  # the same training, not only the same (1-epoch, near-zero) mAP
        runs = [tmp_path / where / "runs" / v / "seed0" for where in ("local", "ray")]
        losses = [[{k: x for k, x in r.items() if "loss" in k} for r in _csv(run / "results.csv")] for run in runs]
        assert losses[0] == losses[1] and losses[0]
        weights = [_weights(run / "weights" / "best.pt") for run in runs]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), v
    log = capsys.readouterr().out
    for head in ("[1/2] yolov8n seed 0", "[2/2] yolov8n-saconv seed 0"):
        assert f"{head}: queued (1 CPU, 0 GPU)" in log and f"{head}: running on " in log
        assert f"{head}: epoch 1/1  mAP50-95 " in log and f"{head}: done in " in log
    assert "ablation ~" in log  # the time left, once a run has finished
    # the driver holds every run's folder and the tables; the workers' folders are gone
    out = tmp_path / "ray"
    for v in ("yolov8n", "yolov8n-saconv"):
        run = out / "runs" / v / "seed0"
        assert {"done.json", "results.csv", "train.log", "args.yaml"} <= {p.name for p in run.iterdir()}
        assert (run / "weights" / "best.pt").stat().st_size > 1e6 and "Epoch" in (run / "train.log").read_text()
    assert [r["variant"] for r in _csv(out / "results.csv")] == ["yolov8n", "yolov8n-saconv"]
    assert (out / "results.md").is_file() and (out / "results.png").is_file()
    # both trained at once on this machine: their latency and train time say so, in the table and on reuse
    assert all(r.get("latency_shared") is True for r in rows) and all(not r.get("latency_shared") for r in local)
    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| yolov8n")]
    assert len(table) == 2 and all(line.count(" (shared)") == 3 for line in table)
    assert "measured on a node shared with other runs" in (out / "results.md").read_text()
    assert not list(local_ray.rglob("*.pt"))
    # the same command reuses what Ray trained
    reused = ablate(["baseline", "saconv"], out=out, ray="local", cpus_per_run=1, **KW)
    assert capsys.readouterr().out.count("reused (done.json)") == 2
    assert all(r.get("latency_shared") is True for r in reused)


def test_killed_worker_is_retried_and_every_row_is_there_once(tmp_path, local_ray, capsys):
    killed = []

    def kill_first_trainer():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for pid_file in local_ray.rglob("seed*.pid"):
                log = pid_file.with_suffix("") / "train.log"
                if log.is_file() and "Epoch" in log.read_text():  # training, not starting
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                    killed.append(pid_file.stem)
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_first_trainer, daemon=True)
    killer.start()
    out = tmp_path / "out"
    rows = ablate(["baseline"], out=out, seeds=[0, 1], ray="local", cpus_per_run=1, keep_weights_on_worker=True, **KW)
    killer.join()
    assert len(killed) == 1
    assert sorted((r["variant"], r["seed"]) for r in rows) == [("yolov8n", 0), ("yolov8n", 1)]
    assert sorted(r["seed"] for r in _csv(out / "results.csv")) == ["0", "1"]
    log = capsys.readouterr().out
    seed = killed[0].removeprefix("seed")
    assert f"yolov8n seed {seed}: retried (attempt 2)" in log and "FAILED" not in log
    assert log.count(": retried (attempt") == 1 and log.count(": done in ") == 2
    # --keep-weights-on-worker: best.pt stays in the worker's folder, the driver's run folder says where
    for s in (0, 1):
        run = out / "runs" / "yolov8n" / f"seed{s}"
        assert not (run / "weights" / "best.pt").exists() and (run / "train.log").is_file()
        kept = (run / "weights" / "best.pt.on-worker").read_text().strip().split(":", 1)[1]
        assert kept.startswith(str(local_ray)) and _weights(kept)


def test_runs_at_once_never_exceed_the_cpus(tmp_path, local_ray):
    """2 CPUs, 2 CPUs a run: one trainer at a time (a task blocked in ray.get would lend its CPUs to the next run)."""
    most, stop = [0], threading.Event()

    def count_trainers():
        while not stop.is_set():
            most[0] = max(most[0], len(list(local_ray.rglob("seed*.pid"))))
            time.sleep(0.05)

    counter = threading.Thread(target=count_trainers, daemon=True)
    counter.start()
    rows = ablate(["baseline"], out=tmp_path / "out", seeds=[0, 1], ray="local", cpus_per_run=2, **KW)
    stop.set()
    counter.join()
    assert len(rows) == 2 and most[0] == 1
    assert not any(r.get("latency_shared") for r in rows)  # one run at a time: the latency is its own


def test_a_failing_run_is_reported_once_with_its_train_log(tmp_path, local_ray, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("nc: 80\nbackbone:\n  - [-1, 1, Conv, [16, 3, 2]]\n  - [-1, 1, NoSuchModule, [32]]\n"
                      "head:\n  - [[-1], 1, Detect, [nc]]\n")  # fmt: skip
    with pytest.raises(ablate_mod.AblationFailed, match="broken seed 0: ModelYamlError: .*NoSuchModule"):
        ablate([str(broken)], out=tmp_path / "out", ray="local", **KW)
    log = capsys.readouterr().out
    assert log.count("[1/1] broken seed 0: FAILED after ") == 1 and "retried" not in log
    run = tmp_path / "out" / "runs" / "broken" / "seed0"
    assert "NoSuchModule" in (run / "train.log").read_text() and not (run / "done.json").exists()


def _main(args, block_ray=False):
    code = (
        ("import sys; sys.modules['ray'] = None\n" if block_ray else "import sys\n")
        + "from yolo_convplug.research.ablate import main\n"
        + f"sys.exit(main({args!r}))"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_ray_missing_is_one_line_before_any_run(tmp_path):
    r = _main(["--ray", "baseline", "--out", str(tmp_path / "out")], block_ray=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == '--ray needs Ray: pip install "yolo-convplug[ray]"\n'
    assert not (tmp_path / "out").exists()


def test_ray_address_that_does_not_answer_is_one_line(tmp_path):
    r = _main(["--ray", "ray://127.0.0.1:9", "baseline", "--out", str(tmp_path / "out")])
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("--ray ray://127.0.0.1:9: cannot join a Ray cluster there: ")
    assert r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_ray_host_port_that_does_not_answer_is_one_line_at_once(tmp_path):
    t = time.perf_counter()
    r = _main(["--ray", "127.0.0.1:9", "baseline", "--out", str(tmp_path / "out")])
    assert r.returncode == 2 and r.stdout == "" and time.perf_counter() - t < 60
    assert r.stderr.startswith("--ray 127.0.0.1:9: no Ray cluster answers there (") and r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_ray_resource_flags_reach_the_ablation(monkeypatch):
    calls = []
    monkeypatch.setattr(ablate_mod, "ablate", lambda variants, **kw: calls.append(kw))
    assert ablate_mod.main(["--ray", "--cpus-per-run", "1", "--gpus-per-run", "0.5", "baseline"]) == 0
    assert ablate_mod.main(["--ray", "auto", "--keep-weights-on-worker", "baseline"]) == 0
    assert ablate_mod.main(["baseline"]) == 0
    assert [(kw["ray"], kw["cpus_per_run"], kw["gpus_per_run"], kw["keep_weights_on_worker"]) for kw in calls] == [
        ("local", 1, 0.5, False),
        ("auto", None, None, True),
        (None, None, None, False),
    ]
    assert ablate_mod.main(["--ray", "--cpus-per-run", "0", "baseline"]) == 2


def test_default_resources_share_the_cpus_among_the_runs_at_once():
    from yolo_convplug.research.execute import default_resources

    assert default_resources(16, 4) == (4, 1.0)  # one run per GPU, the CPUs split among them
    assert default_resources(2, 0) == (2, 0.0)  # CPU only: one run at a time on every CPU
    assert default_resources(1, 2) == (1, 1.0)


@pytest.mark.slow
def test_ultralytics_own_ray_tune_trains_the_plug_in_model_in_every_trial(tmp_path):
    """``YOLO("yolov8n-saconv.yaml").tune(use_ray=True)``, as a user runs it in a fresh process: each Ray Tune trial
    (a Ray worker process) builds the SAConv2d layers and trains them."""
    code = f"""
import glob, sys
from ray import tune
from ultralytics import YOLO
from yolo_convplug.research.data import resolve_data

data = resolve_data({TINY!r})
grid = YOLO("yolov8n-saconv.yaml").tune(
    use_ray=True, search_alg="random", iterations=2, space={{"lr0": tune.uniform(1e-3, 1e-2)}}, data=data, epochs=1,
    imgsz=64, batch=8, workers=0, plots=False, project={str(tmp_path / "runs")!r})
print("TRIALS", len(grid), "ERRORS", grid.num_errors)
"""
    env = {**os.environ, "CONVPLUG_CACHE": str(tmp_path / "cache"), "RAY_DEDUP_LOGS": "0"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                         env=env)  # fmt: skip
    assert "TRIALS 2 ERRORS 0" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    weights = sorted((tmp_path / "runs").rglob("best.pt"))
    assert len(weights) == 2, weights
    for w in weights:  # trained in the trials: the checkpoints hold the plug-in layers
        ckpt = torch.load(w, weights_only=False)
        model = ckpt.get("ema") or ckpt["model"]  # 8.4 keeps only the EMA
        assert [type(m).__name__ for m in model.model].count("SAConv2d") == 3, w


def test_time_left_counts_the_runs_the_cluster_holds_and_the_rest_of_those_in_flight():
    """Just after a run ends, its successor may not have started yet: the estimate divides by the most runs seen at
    once (2 here), not by the runs in flight at that moment (1), and counts only what is left of a started run."""
    from yolo_convplug.research.execute import RayExecutor

    now = time.perf_counter()
    pending = {"a": 0, "b": 1, "c": 2}  # run 0 started 40 s ago, runs 1 and 2 queued; finished runs took 100 s
    eta = RayExecutor._time_left([100.0], pending, {0: 1}, {0: now - 40}, at_once=2)
    assert eta == ", ablation ~2:10 left"  # (60 + 100 + 100) / 2
    assert RayExecutor._time_left([100.0], {}, {}, {}, at_once=2) == ""
