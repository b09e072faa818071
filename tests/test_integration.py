"""Ultralytics integration: the parser patch, the registry API, the model YAMLs and the start-up hook."""

from __future__ import annotations

import ast
import copy
import inspect
import re
import types

import pytest
import torch
import torch.nn as nn
from conftest import CFG_MODELS, MODEL_YAMLS, family, run_python, scaled
from ultralytics.nn.modules import C2f, Conv
from ultralytics.nn.tasks import DetectionModel, parse_model, yaml_model_load

import yolo_convplug
from yolo_convplug import integration
from yolo_convplug.registry import registered

PLUGINS = set(registered())


def build(name: str) -> DetectionModel:
    return DetectionModel(name, ch=3, nc=80, verbose=False)


def layer_channels(model: DetectionModel, imgsz: int = 64) -> list[tuple]:
    """Output shape of every layer for one image (channels and strides, the parser's job)."""
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape))) for m in model.model[:-1]]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, imgsz, imgsz))
    for h in hooks:
        h.remove()
    return shapes


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: p.stem)
def test_every_yaml_builds_at_every_scale_and_runs(path):
    """Each YAML builds at each scale (Ultralytics' scale rule on the file name) and runs a forward pass."""
    for scale in "nsmlx":
        model = build(scaled(path, scale))
        assert {type(m).__name__ for m in model.model} & PLUGINS, f"scale {scale}: none of our modules"
        with torch.no_grad():
            y = model.eval()(torch.zeros(1, 3, 32, 32))[0]
        assert y.shape == (1, 84, 21) and torch.isfinite(y).all(), scale


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: p.stem)
def test_yaml_keeps_stock_channels_and_depth(path):
    """Channels are inferred and width-scaled, repeats depth-scaled, exactly as in the stock model."""
    model = build(scaled(path))
    stock = build(f"{family(path)}n.yaml")
    assert len(model.model) == len(stock.model)
    assert layer_channels(model) == layer_channels(stock)
    for ours, theirs in zip(model.model, stock.model):
        if isinstance(theirs, C2f):  # C2f and C3k2: the row's n, depth-scaled, is inserted for our repeat modules
            assert len(ours.m) == len(theirs.m), type(ours).__name__


@pytest.mark.parametrize("path", [p for p in MODEL_YAMLS if family(p) != "yolov8"], ids=lambda p: p.stem)
def test_newer_yamls_keep_their_family_head(path):
    """YOLO11 (YOLO26) variants build YOLO11's (YOLO26's) detection head even where C3k2 was swapped out
    (`legacy: false`)."""
    model = build(scaled(path))
    stock = build(f"{family(path)}n.yaml")
    assert getattr(type(model.model[-1]), "legacy", False) is False  # Ultralytics < 8.3.100 has no legacy head
    assert sum(p.numel() for p in model.model[-1].parameters()) == sum(p.numel() for p in stock.model[-1].parameters())


def test_plugin_layers_are_ours_and_get_inferred_channels():
    model = build(str(CFG_MODELS / "yolov8n-saconv.yaml"))
    layer = model.model[3]
    assert type(layer).__name__ == "SAConv2d"
    x = torch.zeros(2, 32, 16, 16)  # yolov8n: layer 2 gives 32 channels, layer 3 is 256 * 0.25 = 64
    assert layer.eval()(x).shape == (2, 64, 8, 8)


class _Gate(nn.Module):
    """A user's channel-preserving module: y = x * sigmoid(conv1x1(x))."""

    def __init__(self, c1, scale=1.0):
        super().__init__()
        self.conv = nn.Conv2d(c1, c1, 1)
        self.scale = scale

    def forward(self, x):
        return x * torch.sigmoid(self.scale * self.conv(x))


class _UserConv(nn.Module):
    def __init__(self, c1, c2, k=3, s=1):
        super().__init__()
        self.conv = Conv(c1, c2, k, s)

    def forward(self, x):
        return self.conv(x)


def _yolov8n_dict():
    d = yaml_model_load("yolov8n.yaml")
    return copy.deepcopy(d)


def test_register_user_modules_conv_and_keep_roles():
    yolo_convplug.register(_UserConv, role="conv")
    yolo_convplug.register(role="keep")(_Gate)  # decorator form
    try:
        d = _yolov8n_dict()
        d["backbone"][1] = [-1, 1, "_UserConv", [128, 3, 2]]
        d["backbone"].insert(2, [-1, 1, "_Gate", [0.5]])
        # indices after 2 shift by one: fix the head's references
        for row in d["head"]:
            if isinstance(row[0], list):
                row[0] = [f + 1 if f >= 2 else f for f in row[0]]
        model, _ = parse_model(d, ch=3, verbose=False)
        assert isinstance(model[1], _UserConv) and model[1].conv.conv.out_channels == 32  # 128 * 0.25
        assert isinstance(model[2], _Gate) and model[2].conv.in_channels == 32 and model[2].scale == 0.5
    finally:
        yolo_convplug.unregister("_UserConv")
        yolo_convplug.unregister("_Gate")


def test_register_refuses_ultralytics_names_unless_override():
    class C2f(nn.Module):  # noqa: N801  (a user's module that shadows Ultralytics' name)
        def __init__(self, c1, c2, n=1):
            super().__init__()

    with pytest.raises(ValueError, match="Ultralytics already defines a module named 'C2f'.*override=True"):
        yolo_convplug.register(C2f, role="repeat")
    with pytest.raises(ValueError, match="role='bogus'"):
        yolo_convplug.register(_Gate, role="bogus")
    with pytest.raises(TypeError, match="not an nn.Module"):
        yolo_convplug.register(int)


def test_unknown_module_names_layer_and_closest_names():
    d = _yolov8n_dict()
    d["backbone"][3][2] = "SAConv"
    with pytest.raises(yolo_convplug.ModelYamlError, match=r"layer 3 .*unknown module 'SAConv'.*SAConv2d"):
        parse_model(d, ch=3, verbose=False)


def test_bad_arguments_name_layer_and_expected_args():
    d = _yolov8n_dict()
    d["backbone"][3] = [-1, 1, "SAConv2d", [256, 3, 2, None, 1, 1, True, 5, 6, 7, 8, 9]]
    match = r"layer 3 .*SAConv2d could not be built.*Expected YAML args"
    with pytest.raises(yolo_convplug.ModelYamlError, match=match):
        parse_model(d, ch=3, verbose=False)
    d = _yolov8n_dict()
    d["head"][0] = [-1, 1, "nn.Upsample"]  # a row with three fields
    with pytest.raises(yolo_convplug.ModelYamlError, match=r"layer 10 .*\[from, repeats, module, \[args\]\]"):
        parse_model(d, ch=3, verbose=False)


class _DownloadFails(nn.Module):
    """A stand-in for a stock layer whose weight download fails (Ultralytics' TorchVision layer offline)."""

    def __init__(self, *args):
        super().__init__()
        from urllib.error import URLError

        raise URLError("no network")


def test_environment_errors_of_stock_layers_keep_their_type(monkeypatch):
    """Code that catches OSError/URLError around a model build keeps working; the layer is added as a note."""
    from urllib.error import URLError

    monkeypatch.setattr(nn, "ConvplugDownloadFails", _DownloadFails, raising=False)
    d = _yolov8n_dict()
    d["backbone"][1] = [-1, 1, "nn.ConvplugDownloadFails", []]
    with pytest.raises(URLError) as info:
        parse_model(d, ch=3, verbose=False)
    assert not isinstance(info.value, yolo_convplug.ModelYamlError)
    assert any("model YAML layer 1" in note for note in info.value.__notes__)


def test_wrong_arguments_to_a_stock_layer_are_a_yaml_mistake():
    d = _yolov8n_dict()
    d["backbone"][1] = [-1, 1, "Conv", [128, 3, 2, None, 1, 1, True, "extra"]]  # one argument too many
    with pytest.raises(yolo_convplug.ModelYamlError, match=r"layer 1 .*Conv could not be built.*TypeError"):
        parse_model(d, ch=3, verbose=False)


def test_yolo26_on_older_ultralytics_names_the_version_needed(monkeypatch):
    monkeypatch.setattr(integration, "ultralytics_version", lambda: "8.3.0")
    match = r"YOLO26 YAMLs need Ultralytics >= 8\.4 \(installed: 8\.3\.0\)"
    with pytest.raises(yolo_convplug.UnsupportedUltralyticsError, match=match):
        build(str(CFG_MODELS / "yolo26n-saconv.yaml"))
    assert build("yolov8n.yaml")  # other families still build


def test_supported_range_is_the_one_pyproject_declares():
    from yolo_convplug import ultralytics_compat as compat

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    deps = tomllib.loads((CFG_MODELS.parents[2] / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"ultralytics{compat.SUPPORTED_RANGE}" in deps
    low, high = compat.SUPPORTED_RANGE.split(",")
    assert compat.parse_version(low.lstrip(">=")) == compat.MINIMUM
    assert compat.parse_version(high.lstrip("<")) == compat.BELOW
    assert compat.in_supported_range("8.4.190") and not compat.in_supported_range("8.5.0")
    assert not compat.in_supported_range("8.2.103") and compat.parse_version("8.4.0rc1") == (8, 4, 0)


def test_package_exports_every_module_class():
    """``from yolo_convplug import *`` and the lazy attributes name exactly the module classes that exist."""
    from yolo_convplug import modules

    assert set(yolo_convplug._MODULE_CLASSES) == set(modules.__all__)
    assert all(getattr(yolo_convplug, name) is getattr(modules, name) for name in modules.__all__)


def test_unrecognised_parse_model_names_version_and_range():
    """A parse_model without the sets we extend is refused with the version and the supported range."""
    fake = types.ModuleType("fake_tasks")
    exec("def parse_model(d, ch, verbose=True):\n    return d\n", vars(fake))
    fake.BaseModel = type("BaseModel", (), {"fuse": lambda self: self})
    with pytest.raises(yolo_convplug.UnsupportedUltralyticsError, match=r"Ultralytics [\d.]+.*>=8\.3\.0,<8\.5"):
        integration.patch_tasks(fake)
    d = {"backbone": [[-1, 1, "SAConv2d", [16]]], "head": []}
    with pytest.raises(yolo_convplug.UnsupportedUltralyticsError):  # a YAML with our modules gets the same error
        fake.parse_model(d, 3)
    assert fake.parse_model({"backbone": [[-1, 1, "Conv", [16]]], "head": []}, 3)  # stock YAMLs still work


def test_patch_recompiles_the_installed_parse_model_and_builds_every_registered_module_by_its_role():
    """The patched parse_model is the installed function's own source, rewritten and compiled with tasks' globals at
    its own file and first line (tracebacks point at tasks.py), and it builds every registered module as its role
    says: conv-role rows get c1 inserted and c2 width-scaled like Conv, repeat-role rows also the depth-scaled n."""
    import ultralytics.nn.tasks as tasks

    original = tasks.parse_model.__wrapped__
    patched = inspect.getclosurevars(tasks.parse_model).nonlocals["patched"]
    assert patched.__code__ is not original.__code__ and patched.__globals__ is vars(tasks)
    assert patched.__code__.co_filename == original.__code__.co_filename == tasks.__file__
    assert patched.__code__.co_firstlineno == original.__code__.co_firstlineno
    entries = registered()
    assert {"ODConv", "DCNv2", "SPConv", "C2f_Faster"} <= set(entries)
    for name, entry in entries.items():
        repeats, args = (3, [64]) if entry.role == "repeat" else (1, [64, 3, 1])
        d = {"nc": 80, "scales": {"n": [0.33, 0.25, 1024]}, "scale": "n",
             "backbone": [[-1, 1, "Conv", [64, 3, 2]], [-1, repeats, name, args]], "head": []}  # fmt: skip
        model, _ = tasks.parse_model(d, 3, verbose=False)
        assert type(model[1]) is entry.cls, name
        with torch.no_grad():
            assert model.eval()(torch.rand(1, 3, 32, 32)).shape[1] == 16, name  # c1 = 16 in, 64 x 0.25 out
        if entry.role == "repeat":
            assert len(model[1].m) == 1, name  # n = 3 x 0.33


def _parser_sets() -> dict[str, set[str]]:
    """The names in the installed parse_model's ``base_modules = frozenset({...})``/``repeat_modules = ...``, read
    from its source independently of the patch (module attributes such as ``torch.nn.ConvTranspose2d`` left out:
    a YAML writes them ``nn.ConvTranspose2d``, which no role set resolves)."""
    import ultralytics.nn.tasks as tasks

    sets = {}
    for node in ast.walk(ast.parse(inspect.getsource(tasks.parse_model.__wrapped__))):
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] in (["base_modules"],
                                                                                              ["repeat_modules"]):
            elements = next(n for n in ast.walk(node.value) if isinstance(n, ast.Set)).elts
            sets[node.targets[0].id] = {e.id for e in elements if isinstance(e, ast.Name)}
    return sets


def test_ultralytics_roles_match_the_installed_parser():
    """The roles we read from Ultralytics (swap tool, error hints) are the sets its parser tests: Conv builds as
    conv, C2f and C3k2 as repeat, and every other member of ``base_modules``/``repeat_modules`` as the parser does."""
    roles = integration.ultralytics_roles()
    assert roles["Conv"] == "conv" and roles["C2f"] == "repeat" and roles["C3k2"] == "repeat"
    assert not set(roles) & set(registered()), "our modules are not Ultralytics' own"
    sets = _parser_sets()
    if set(sets) != {"base_modules", "repeat_modules"}:
        pytest.skip("this Ultralytics writes its module sets inline (8.3.0-era), not as base_modules/repeat_modules")
    assert {n for n, r in roles.items() if r == "repeat"} == sets["repeat_modules"]
    assert {n for n, r in roles.items() if r == "conv"} == sets["base_modules"] - sets["repeat_modules"]


# --- the start-up hook: every process, no import in user code ------------------------------------------------


def test_fresh_process_without_import_builds_plugin_yaml():
    code = (
        "from ultralytics import YOLO\n"
        "m = YOLO('model_yamls/yolov8n-condconv.yaml')\n"
        "print(sorted({type(l).__name__ for l in m.model.model}))"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "CondConv" in result.stdout


def test_ultralytics_import_stays_lazy():
    """``from ultralytics import YOLO`` imports nothing heavy because of us (Ultralytics defers torchvision), and a
    stock YAML builds without our module files; a YAML naming our modules loads them, still without torchvision."""
    code = (
        "import sys\nfrom ultralytics import YOLO\n"
        "heavy = ('torchvision', 'onnx', 'torch.onnx', 'yolo_convplug.modules', 'yolo_convplug.research')\n"
        "print(*[m for m in heavy if m in sys.modules])\n"
        "YOLO('yolov8n.yaml')\nprint(*[m for m in heavy if m in sys.modules])\n"
        "YOLO('yolov8n-saconv.yaml')\nprint('torchvision' in sys.modules, 'yolo_convplug.modules' in sys.modules)"
    )
    for env in ({}, {"YOLO_CONVPLUG_DISABLE": "1"}):
        result = run_python(code if not env else code.rsplit("\n", 2)[0], env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        lines = result.stdout.splitlines()
        assert lines[:2] == ["", ""], (env, result.stdout)
        if not env:
            assert lines[2] == "False True", result.stdout


def test_disable_env_turns_the_hook_off():
    code = "from ultralytics import YOLO\nYOLO('model_yamls/yolov8n-saconv.yaml')"
    result = run_python(code, env={"YOLO_CONVPLUG_DISABLE": "1"})
    assert result.returncode != 0 and "SAConv2d" in result.stderr


def test_hook_is_cheap_and_imports_neither_torch_nor_ultralytics():
    code = "import sys; print(*(m in sys.modules for m in ('torch', 'ultralytics', 'yolo_convplug_autoload')))"
    result = run_python(code)
    assert result.stdout.split() == ["False", "False", "True"], result.stdout + result.stderr
    timing = run_python("pass", env={"PYTHONPROFILEIMPORTTIME": "1"})
    row = next(line for line in timing.stderr.splitlines() if line.rstrip().endswith("yolo_convplug_autoload"))
    cumulative_us = int(re.split(r"\s*\|\s*", row.split(":", 1)[1])[1])
    assert cumulative_us < 5000, row


def test_broken_install_never_breaks_python_start(tmp_path):
    (tmp_path / "yolo_convplug_autoload.py").write_text("raise RuntimeError('broken install')\n")
    result = run_python("print('started')", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0 and result.stdout.strip() == "started"
    assert "Traceback" not in result.stderr


def test_ultralytics_gflops_count_functional_convolutions():
    """thop (Ultralytics' model.info) counts the kernels our modules compute: DSConv has Conv's FLOPs, SAConv two
    convs."""
    from ultralytics.utils.torch_utils import get_flops

    base = get_flops(build("yolov8n.yaml"), 320)
    dsconv = get_flops(build(str(CFG_MODELS / "yolov8n-dsconv.yaml")), 320)
    saconv = build(str(CFG_MODELS / "yolov8n-saconv.yaml"))
    extra = sum(2 * m.conv.weight.numel() for m in saconv.model if type(m).__name__ == "SAConv2d")  # at least this
    assert dsconv == pytest.approx(base, rel=1e-3)
    assert get_flops(saconv, 320) > base + extra / 1e9
    assert get_flops(build(str(CFG_MODELS / "yolov8n-condconv.yaml")), 320) == pytest.approx(base, rel=0.02)
