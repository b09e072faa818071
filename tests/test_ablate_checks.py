"""The ablation checks its inputs once, before any run trains (one message, exit code 2), refuses weights that do not
fit the baseline, says how to resume after Ctrl-C, labels the offline fallback's protocol, and draws the seed spread
on a single-seed plot."""

import torch
from ultralytics.nn.tasks import DetectionModel

from yolo_convplug.research import ablate as ablate_mod
from yolo_convplug.research.checks import ArgumentError, check_transfer, load_weights
from yolo_convplug.research.data import make_shapes

TINY = "shapes:train=16,val=8,imgsz=64"


def _checkpoint(path, cfg: str, nc: int = 80):
    torch.save({"model": DetectionModel(cfg, nc=nc, verbose=False).half()}, path)
    return str(path)


def test_bad_arguments_give_one_message_and_exit_2_before_any_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CONVPLUG_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    cases = [
        (["--pretrained", "/nosuch.pt"], "--pretrained /nosuch.pt: no such file"),
        (["--pretrained", str(text)], "does not load as an Ultralytics checkpoint"),
        (["epochs=abc"], "'epochs' must be an int"),
        (["epoch=3"], "'epoch' is not a valid YOLO argument"),
        (["--data", "/nosuch.yaml"], "data='/nosuch.yaml': no such file"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        assert ablate_mod.main(["baseline", "saconv", "--data", TINY, *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
        assert "Rerun" not in err[0] and not (out / "runs").exists()  # refused before any run


def test_checkpoint_of_another_model_is_refused_and_other_classes_fit(tmp_path):
    other = _checkpoint(tmp_path / "yolo11n.pt", "yolo11n.yaml")
    try:
        check_transfer(other, load_weights(other), "yolov8n.yaml", nc=4)
        raise AssertionError("a yolo11n checkpoint was accepted for a yolov8n baseline")
    except ArgumentError as e:
        msg = str(e)
    assert "does not fit the baseline" in msg and "yolo11n.yaml (scale n, nc 80)" in msg
    assert "yolov8n.yaml (scale n, nc 4)" in msg
    coco = _checkpoint(tmp_path / "yolov8n-coco.pt", "yolov8n.yaml", nc=80)  # only the class head differs
    n, total = check_transfer(coco, load_weights(coco), "yolov8n.yaml", nc=4)
    full = len(DetectionModel("yolov8n.yaml", nc=4, verbose=False).state_dict())
    cls_branch = [k for k in DetectionModel("yolov8n.yaml", nc=4, verbose=False).state_dict() if ".22.cv3." in k]
    assert total == full and full - len(cls_branch) <= n < full  # all but the class branch, whose width follows nc


def test_ctrl_c_says_how_many_runs_finished_and_how_to_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CONVPLUG_CACHE", str(tmp_path / "cache"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("yolo_convplug.research.execute.run_one", interrupted)
    argv = ["baseline", "--data", TINY, "epochs=1", "--out", str(tmp_path / "o")]
    assert ablate_mod.main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ablate: interrupted: 0 of 1 runs finished, kept in {tmp_path / 'o'}; resume with: convplug "
                   f"ablate baseline --data {TINY} epochs=1 --out {tmp_path / 'o'}"]  # fmt: skip


def test_offline_fallback_is_labelled_shapes(tmp_path):
    data = str(make_shapes(TINY, root=tmp_path))
    assert ablate_mod.data_label(None, data) == "shapes"
    assert ablate_mod.data_label(TINY, data) == TINY
    assert ablate_mod.data_label(None, str(tmp_path / "coco128.yaml")) == "coco128.yaml"


def test_warm_start_check_bad_paths_give_one_message_and_exit_2(tmp_path, capsys):
    """``scripts/warm_start_check.py`` with a missing data YAML, missing weights or a file that is no checkpoint: one
    line naming the argument, exit code 2, before any model is built."""
    from yolo_convplug.research import conversion

    data = str(make_shapes(TINY, root=tmp_path))
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    weights = _checkpoint(tmp_path / "stock.pt", "yolov8n.yaml", nc=4)
    cases = [
        (weights, "/nosuch.yaml", "data='/nosuch.yaml': no such file"),
        ("/nosuch.pt", data, "weights /nosuch.pt: no such file"),
        (str(text), data, f"weights {text}: does not load as an Ultralytics checkpoint"),
    ]
    for stock, data_yaml, message in cases:
        assert conversion.main([stock, "yolov8n-saconv.yaml", "--data", data_yaml, "--imgsz", "64"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (stock, data_yaml, err)
