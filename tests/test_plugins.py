"""Users' own modules in every process: ``$YOLO_CONVPLUG_MODULES`` and the ``yolo_convplug.modules`` entry points
(imported when the parser first builds a model, a broken one reported by name), and ``register()``'s refusal of
attribute names Ultralytics sets on every layer."""

import os

import pytest
import torch.nn as nn
import yaml
from conftest import run_python

import yolo_convplug

USER_MODULE = '''
import torch.nn as nn
import yolo_convplug
from ultralytics.nn.modules import Conv

print("importing {name}")


@yolo_convplug.register(role="conv")
class {cls}(nn.Module):
    def __init__(self, c1, c2, k=3, s=1):
        super().__init__()
        self.conv = Conv(c1, c2, k, s)

    def forward(self, x):
        return self.conv(x)
'''

BUILD = """
from ultralytics.nn.tasks import DetectionModel
for _ in range(2):  # the second build must neither re-import nor warn again
    m = DetectionModel("yolov8n-mine.yaml", verbose=False)
print("layer 1:", type(m.model[1]).__name__, m.model[1].conv.conv.out_channels)
"""


def _user_yaml(folder, cls: str) -> None:
    """``yolov8n-mine.yaml`` in ``folder``: yolov8.yaml with layer 1 built by the user's module ``cls``."""
    from yolo_convplug.swap import load_model_yaml

    d, _ = load_model_yaml("yolov8.yaml")
    d["backbone"][1] = [-1, 1, cls, [128, 3, 2]]
    (folder / "yolov8-mine.yaml").write_text(yaml.safe_dump(d, sort_keys=False))


def _env(path) -> dict:
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")]))}


def test_env_var_modules_register_in_a_fresh_process(tmp_path):
    (tmp_path / "my_convs.py").write_text(USER_MODULE.format(name="my_convs", cls="EnvConv"))
    (tmp_path / "broken_convs.py").write_text("raise ImportError('missing dependency foo')\n")
    _user_yaml(tmp_path, "EnvConv")
    env = {**_env(tmp_path), "YOLO_CONVPLUG_MODULES": "broken_convs, my_convs,"}
    r = run_python(BUILD, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "layer 1: EnvConv 32" in r.stdout  # no import of ours in the code: the start-up hook loaded it
    assert r.stdout.count("importing my_convs") == 1
    warnings = [line for line in r.stderr.splitlines() if "broken_convs" in line]
    assert len(warnings) == 1, r.stderr[-3000:]  # reported once, by name, and the other module still registered
    assert "YOLO_CONVPLUG_MODULES" in warnings[0] and "missing dependency foo" in warnings[0]


def test_entry_point_modules_register_in_a_fresh_process(tmp_path):
    (tmp_path / "ep_convs.py").write_text(USER_MODULE.format(name="ep_convs", cls="EpConv"))
    dist = tmp_path / "my_plugin-1.0.dist-info"  # what `pip install` of a package declaring the entry point leaves
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[yolo_convplug.modules]\nconvs = ep_convs\nbad = no_such_module_xyz\n")
    _user_yaml(tmp_path, "EpConv")
    r = run_python(BUILD, cwd=tmp_path, env=_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "layer 1: EpConv 32" in r.stdout
    assert r.stderr.count("entry point bad = no_such_module_xyz (group yolo_convplug.modules) failed") == 1


def test_load_user_modules_imports_each_once(tmp_path, monkeypatch, capsys):
    from yolo_convplug import plugins

    (tmp_path / "once_convs.py").write_text(USER_MODULE.format(name="once_convs", cls="OnceConv"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("YOLO_CONVPLUG_MODULES", "once_convs,not_there_xyz")
    try:
        plugins.load_user_modules()
        plugins.load_user_modules()
        out, err = capsys.readouterr()
        assert "OnceConv" in yolo_convplug.registered() and out.count("importing once_convs") == 1
        assert len([line for line in err.splitlines() if "not_there_xyz" in line]) == 1
    finally:
        yolo_convplug.unregister("OnceConv")


def test_swap_sees_user_modules_before_any_model_is_built(tmp_path, monkeypatch):
    from yolo_convplug.swap import swap_yaml

    (tmp_path / "swap_convs.py").write_text(USER_MODULE.format(name="swap_convs", cls="SwapConv"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("YOLO_CONVPLUG_MODULES", "swap_convs")
    try:
        d = swap_yaml("yolov8.yaml", "Conv=SwapConv", scope="strided")  # as `convplug swap` in a fresh process
        assert [r[2] for r in d["backbone"]].count("SwapConv") == 5
    finally:
        yolo_convplug.unregister("SwapConv")


class _ClashF(nn.Module):
    def __init__(self, c1, c2):
        super().__init__()
        self.f = nn.Conv2d(c1, c2, 1)  # a submodule named like the layer's from-index


class _ClashI(nn.Module):
    def __init__(self, c1, c2):
        super().__init__()
        self.i = 0


class _ClashType(nn.Module):
    type = "gate"


class _ClashNp(nn.Module):
    def __init__(self, c1, c2):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, 1)
        self.np = c2


@pytest.mark.parametrize("cls, attr", [(_ClashF, "f"), (_ClashI, "i"), (_ClashType, "type"), (_ClashNp, "np")])
def test_register_refuses_attributes_ultralytics_sets_on_layers(cls, attr):
    match = rf"register\({cls.__name__}\): attribute\(s\) '{attr}' clash with what Ultralytics"
    with pytest.raises(ValueError, match=match):
        yolo_convplug.register(cls, role="conv")
    assert cls.__name__ not in yolo_convplug.registered()


def test_env_var_modules_import_from_the_working_directory(tmp_path):
    """A console script (``yolo``) has no working directory on sys.path (``python -P`` reproduces that): a module
    named in $YOLO_CONVPLUG_MODULES is still found in the working directory, and a missing one is named with the
    folders searched and what to set."""
    import subprocess
    import sys

    (tmp_path / "my_mod.py").write_text(USER_MODULE.format(name="my_mod", cls="CwdConv"))
    _user_yaml(tmp_path, "CwdConv")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def build(modules):
        env = {**clean, "YOLO_CONVPLUG_MODULES": modules}
        return subprocess.run([sys.executable, "-P", "-c", BUILD], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip

    r = build("my_mod")
    assert r.returncode == 0 and "layer 1: CwdConv 32" in r.stdout, r.stderr[-3000:]
    r = build("my_mod,no_such_mod")
    line = next(x for x in r.stderr.splitlines() if "no_such_mod" in x)
    assert f"in the working directory {tmp_path}" in line and "set PYTHONPATH" in line
