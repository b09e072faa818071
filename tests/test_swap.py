"""The swap tool: layer indices kept, arguments carried by name, refusals naming the layer, YOLO-World verified the
way Ultralytics builds it, and ``convplug swap`` (clear errors, an output name that carries the scale)."""

import re

import pytest
import yaml

import yolo_convplug  # noqa: F401  (registers the plug-ins with Ultralytics)
from yolo_convplug import swap as swap_mod
from yolo_convplug import swap_verify
from yolo_convplug.cli import main
from yolo_convplug.model_yaml import ModelYamlError, rows
from yolo_convplug.swap import SwapError, load_model_yaml, parse_rules, swap_dict, swap_yaml


@pytest.mark.parametrize(
    "source, rules, scope, expect",
    [
        ("yolov8.yaml", "Conv=SAConv2d", "strided", {0: "SAConv2d", 1: "SAConv2d", 3: "SAConv2d", 5: "SAConv2d",
                                                    7: "SAConv2d", 16: "SAConv2d", 19: "SAConv2d"}),
        ("yolov8n.yaml", ["C2f=C2f_Faster", "Conv=DSConv2d"], "1-4", {1: "DSConv2d", 2: "C2f_Faster", 3: "DSConv2d",
                                                                       4: "C2f_Faster"}),
        ("yolo11n.yaml", "Conv=CondConv", "head", {17: "CondConv", 20: "CondConv"}),
        ("yolo11.yaml", "C3k2=C2f_Faster", "all", dict.fromkeys((2, 4, 6, 8, 13, 16, 19, 22), "C2f_Faster")),
        # YOLO26's SPPF row [1024, 5, 3, True] has no stride: "strided" reads the argument named s, not args[2];
        # layer 0 (3 RGB channels) keeps Conv: ScConv refuses it, and a named scope skips such layers
        ("yolo26.yaml", "Conv=ScConv", "strided", dict.fromkeys((1, 3, 5, 7, 17, 20), "ScConv")),
    ],
)  # fmt: skip
def test_swap_builds_and_keeps_indices(tmp_path, source, rules, scope, expect):
    out = swap_yaml(source, rules, scope=scope, out=tmp_path / "swapped.yaml")
    src, _ = load_model_yaml(source)
    new = yaml.safe_load(out.read_text())
    assert len(rows(new)) == len(rows(src))
    for i, (a, b) in enumerate(zip(rows(src), rows(new))):
        if i in expect:
            assert b[2] == expect[i] and b[:2] == a[:2], (i, a, b)
        else:
            assert b == a, (i, a, b)

    from ultralytics.nn.tasks import parse_model

    src_model, _ = parse_model({**src, "scale": "n"}, ch=3, verbose=False)
    src_legacy = src_model[-1].legacy
    new_model, _ = parse_model({**new, "scale": "n"}, ch=3, verbose=False)
    assert new_model[-1].legacy == src_legacy  # the yolo11 head is kept even without any C3k2
    assert ("legacy" in new) == (source.startswith("yolo11") and "C3k2" in str(rules))
    # pretrained= transfer: every untouched layer's weights still fit
    sa, sb = src_model.state_dict(), new_model.state_dict()
    untouched = [k for k in sa if int(k.split(".")[0]) not in expect]
    assert untouched and all(k in sb and sb[k].shape == sa[k].shape for k in untouched)


def test_swap_carries_arguments_by_name():
    src, _ = load_model_yaml("yolov8.yaml")
    src["backbone"][0] = [-1, 1, "Conv", [64]]
    d, changes = swap_dict(src, "Conv=SAConv2d", scope="0")
    assert rows(d)[0] == [-1, 1, "SAConv2d", [64, 1]] and changes == [(0, "Conv", "SAConv2d", [])]  # k=1 kept
    d, changes = swap_dict(load_model_yaml("yolo11n.yaml")[0], "C3k2=C2f_Faster", scope="2,6")
    assert rows(d)[2][3] == [256, True, 1, 0.25]  # C3k2's implicit shortcut=True made explicit
    assert changes[1] == (6, "C3k2", "C2f_Faster", ["c3k=True"])  # reported as dropped


@pytest.mark.parametrize(
    "rules, scope, match",
    [
        ("C2f=SAConv2d", "all", r"layer 2 \[-1, 3, 'C2f'.*repeat role"),
        ("Conv=C2f_Faster", "3", r"layer 3 \[-1, 1, 'Conv'.*conv role"),
        ("Conv=FasterBlock", "strided", r"layer 0 .*stride"),
        ("Conv=SPPF", "5", r"layer 5 .*SPPF has no stride argument"),
        ("Conv=Focus", "0", r"layer 0 \[-1, 1, 'Focus'.*differs from the original"),  # Focus halves the map again
        ("Conv=NoSuchConv", "all", r"unknown module 'NoSuchConv'"),
        ("Cnv=SAConv2d", "all", r"matched no layer"),
        ("Conv=SAConv2d", "40", r"0\.\.22"),
        (["Conv=DSConv2d", "Conv=ScConv"], "all", r"two rules for Conv \(Conv=DSConv2d and Conv=ScConv\)"),
    ],
)
def test_swap_refuses_naming_the_layer(rules, scope, match):
    with pytest.raises(SwapError, match=match) as e:
        swap_yaml("yolov8.yaml", rules, scope=scope)
    assert isinstance(e.value, ModelYamlError)  # one error family (and wording) with the parser's layer errors


def test_repeated_identical_rule_is_one_rule():
    assert parse_rules(["Conv=SAConv2d", "Conv=SAConv2d,C2f=C2f_Faster"]) == {"Conv": "SAConv2d", "C2f": "C2f_Faster"}


def test_yolo_world_is_verified_as_a_world_model(tmp_path):
    """YOLO-World's C2fAttn layers need the text embeddings (``guide``) that only WorldModel's forward passes."""
    out = swap_yaml("yolov8s-worldv2.yaml", "Conv=ScConv", scope="strided", out=tmp_path / "yolov8s-worldv2-sc.yaml")
    assert "Not verified" not in out.read_text()
    swapped = [r[2] for r in rows(yaml.safe_load(out.read_text()))]
    assert swapped.count("ScConv") == 6 and swapped[0] == "Conv"  # layer 0 (RGB input) skipped: ScConv refuses it
    with pytest.raises(SwapError, match=r"layer 0 \[-1, 1, 'Focus'.*differs from the original"):
        swap_yaml("yolov8s-worldv2.yaml", "Conv=Focus", scope="0")  # the check really runs on World models


def test_unrunnable_source_is_written_and_marked_unverified(tmp_path, monkeypatch):
    class Unbuildable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("needs a text model")

    monkeypatch.setattr(swap_verify, "model_class", lambda d: Unbuildable)
    out = swap_yaml("yolov8.yaml", "Conv=SAConv2d", scope="strided", out=tmp_path / "yolov8n-sa.yaml")
    assert re.search(r"Not verified: .*needs a text model", out.read_text())  # the marker and the source's error


def test_cli_swap_names_the_output_with_its_scale(tmp_path, monkeypatch, capsys):
    from ultralytics.nn.tasks import yaml_model_load

    monkeypatch.chdir(tmp_path)
    assert main(["swap", "yolo26.yaml", "Conv=SAConv2d", "--scope", "strided"]) == 0
    assert capsys.readouterr().out.strip() == "wrote yolo26n-saconv2d.yaml"
    d = yaml_model_load("yolo26n-saconv2d.yaml")  # the local file, at the scale its name carries
    assert d["scale"] == "n" and d["end2end"] and rows(d)[3][2] == "SAConv2d"

    assert main(["swap", "yolov8.yaml", "--scale", "s", "C2f=C2f_Faster", "--scope", "backbone"]) == 0
    assert (tmp_path / "yolov8s-c2f_faster.yaml").exists()

    assert main(["swap", "yolov8.yaml", "Conv=DWConv", "--scope", "head", "-o", "my.yaml"]) == 0
    err = capsys.readouterr().err
    assert "my.yaml carries none" in err and "yolov8n-my.yaml" in err
    assert [r[2] for r in yaml.safe_load((tmp_path / "my.yaml").read_text())["head"]].count("DWConv") == 2


@pytest.mark.parametrize(
    "argv, match",
    [
        (["nosuch.yaml", "Conv=SAConv2d"], "swap refused: model YAML 'nosuch.yaml' not found"),
        (["yolov8.yaml", "C2f=SAConv2d"], "swap refused: model YAML layer 2 "),
        (["yolov8.yaml", "Conv=DSConv2d", "Conv=ScConv"], "swap refused: two rules for Conv"),
    ],
)
def test_cli_swap_refuses_without_traceback(tmp_path, monkeypatch, capsys, argv, match):
    monkeypatch.chdir(tmp_path)
    assert main(["swap", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(match) and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_default_output_never_hides_a_shipped_yaml(tmp_path, monkeypatch, capsys):
    """A swap whose natural name is a shipped YAML's (yolov8n-scconv.yaml) writes another name; an explicit -o of
    such a name is written but warned about, since from that folder the name then builds the user's file."""
    assert swap_mod.default_output("yolov8.yaml", "C2f=ScConv", "n").name == "yolov8n-scconv-swap.yaml"
    assert swap_mod.default_output("yolov8.yaml", "Conv=SAConv2d", "n").name == "yolov8n-saconv2d.yaml"
    monkeypatch.chdir(tmp_path)
    assert main(["swap", "yolov8.yaml", "Conv=ScConv", "--scope", "1", "-o", "yolov8n-scconv.yaml"]) == 0
    assert "now builds this file instead of the shipped yolov8-scconv.yaml" in capsys.readouterr().err


def test_scope_all_skips_layers_the_module_refuses(tmp_path, caplog):
    """ScConv refuses layer 0 (3 RGB channels): a named scope keeps Conv there, says so, and swaps the rest;
    an explicit layer list naming layer 0 is still refused."""
    out = swap_yaml("yolov8.yaml", "Conv=ScConv", scope="backbone", out=tmp_path / "yolov8n-x.yaml")
    d = yaml.safe_load(out.read_text())
    assert d["backbone"][0][2] == "Conv" and [r[2] for r in d["backbone"][1:5:2]] == ["ScConv", "ScConv"]
    text = out.read_text()
    assert "layer 0 skipped: ScConv cannot serve it (ScConv: c1=3 is not valid" in text
    assert "layer 0 kept Conv: ScConv cannot serve it" in caplog.text
    with pytest.raises(SwapError, match=r"layer 0 .*c1=3 is not valid"):
        swap_yaml("yolov8.yaml", "Conv=ScConv", scope="0,1")
