"""Bad input, for every module: each case either works or gets an error that names the layer/argument and the fix.

Cases: wrong YAML argument types and counts (through Ultralytics' parser -> ``ModelYamlError``), channel counts and
options a module cannot take (directly -> ``ValueError``; through a YAML -> ``ModelYamlError``), imgsz 32 and batch 1
in training for every model YAML (compared with stock YOLO), misspelt module names, and an Ultralytics whose version
or ``parse_model`` is outside what we support. tests/test_integration.py covers the basic unknown-name, bad-row and
fake-``parse_model`` cases; this extends them. The bad arguments every module shares (channel counts of the wrong
type or value) and every width-scaled channel count on 1x1 maps are in tests/test_contract.py.
"""

from __future__ import annotations

import copy
import inspect
import re
import types
from pathlib import Path

import pytest
import torch
import ultralytics.nn.tasks as tasks
from conftest import MODEL_YAMLS, family, scaled, train_feats
from module_checks import takes_kernel_and_stride
from ultralytics.nn.tasks import DetectionModel, parse_model

import yolo_convplug
from yolo_convplug import (
    AKConv,
    C2f_Faster,
    CondConv,
    DCNv2,
    DiverseBranchBlock,
    DSConv2d,
    DySnakeConv,
    FasterBlock,
    ModelYamlError,
    ODConv,
    PConv,
    SAConv2d,
    ScConv,
    SPConv,
    SPDConv,
    integration,
)
from yolo_convplug.registry import registered

INTEGRATION_PY = Path(integration.__file__).name


def _builds(cls, *args) -> bool:
    try:
        cls(*args)
    except ValueError:
        return False
    return True


# every registered module that stands in for Conv(c1, c2, k, s), a widening stride-2 one included, takes the
# generic YAML cases below (PConv keeps its channels and stride: its own rows)
CONV_LIKE = {
    n: e.cls
    for n, e in registered().items()
    if e.role == "conv" and takes_kernel_and_stride(e.cls) and _builds(e.cls, 32, 64, 3, 2)
}
# a valid YAML row for each module at layer 2 of a two-Conv stem (layer 1 gives 128 * 0.25 = 32 channels at scale n)
VALID_ROWS = {
    **{name: [-1, 1, name, [256, 3, 2]] for name in CONV_LIKE},
    "PConv": [-1, 1, "PConv", [128]],  # channel-preserving: c2 (scaled) must equal c1 = 32
    "FasterBlock": [-1, 1, "FasterBlock", [128]],
    "C2f_Faster": [-1, 3, "C2f_Faster", [128, True]],
}


def yaml_dict(row: list) -> dict:
    """A scale-n model dict: Conv(64, 3, 2), Conv(128, 3, 2), then ``row`` (layer 2)."""
    return {
        "nc": 80,
        "scales": {"n": [0.33, 0.25, 1024]},
        "scale": "n",
        "backbone": [[-1, 1, "Conv", [64, 3, 2]], [-1, 1, "Conv", [128, 3, 2]], copy.deepcopy(row)],
        "head": [],
    }


def parse(row: list):
    return parse_model(yaml_dict(row), ch=3, verbose=False)


def assert_short(excinfo) -> None:
    """The error is raised by our parser wrapper itself, with the torch/Ultralytics chain suppressed."""
    assert Path(excinfo.traceback[-1].path).name == INTEGRATION_PY, excinfo.traceback[-1]
    assert excinfo.value.__suppress_context__ and excinfo.value.__cause__ is None


@pytest.mark.parametrize("name", VALID_ROWS)
def test_valid_rows_build(name):
    """The baseline the bad cases below change one thing of."""
    layers, _ = parse(VALID_ROWS[name])
    assert type(layers[2]).__name__ == name


# --- wrong YAML argument types and counts ---------------------------------------------------------------------

# (module, YAML args, what the error must say about the problem). Args follow the inserted c1.
YAML_TYPE_CASES = [
    *[(n, ["sixty-four", 3, 2], r"sixty-four") for n in CONV_LIKE],  # c2 not a number
    *[(n, [256, 3.5, 2], r"k=3\.5 is not valid") for n in CONV_LIKE],  # float kernel
    *[(n, [256, [3, 3], 2], r"k=\[3, 3\] is not valid") for n in CONV_LIKE],  # list kernel
    *[(n, [256, 3, "two"], r"s='two' is not valid") for n in CONV_LIKE],  # string stride
    *[(n, [256, 3, 2, None, 1, 1, True, 4, 5, 6, 7, 8, 9, 10], r"positional argument") for n in CONV_LIKE],
    ("PConv", ["sixty-four"], r"sixty-four"),
    ("PConv", [128, 3.5], r"k=3\.5 is not valid"),
    ("PConv", [128, [3, 3]], r"k=\[3, 3\] is not valid"),
    ("PConv", [128, 3, 1, 4, 5], r"positional argument"),
    ("FasterBlock", ["sixty-four"], r"sixty-four"),
    ("FasterBlock", [128, 2.5], r"n_div=2\.5 is not valid"),
    ("FasterBlock", [128, [4]], r"n_div=\[4\] is not valid"),
    ("FasterBlock", [128, 4, "two"], r"mlp_ratio='two' is not valid"),
    ("FasterBlock", [128, 4, 2, 0.0, True, True, 7], r"positional argument"),
    ("C2f_Faster", ["sixty-four", True], r"sixty-four"),
    ("C2f_Faster", [128, True, 1, "half"], r"e='half' is not valid"),
    ("C2f_Faster", [128, True, 1, 0.5, 2.5], r"n_div=2\.5 is not valid"),
    ("C2f_Faster", [128, True, 1, 0.5, 4, 2, 0.0, 8], r"positional argument"),
]


@pytest.mark.parametrize(("name", "args", "problem"), YAML_TYPE_CASES, ids=lambda v: repr(v)[:24])
def test_wrong_yaml_argument_types_and_counts(name, args, problem):
    """A row with a wrong type or too many args: ModelYamlError naming layer 2, the module, the problem, the
    expected YAML args; no stack trace into torch."""
    with pytest.raises(ModelYamlError) as excinfo:
        parse([-1, 1, name, args])
    message = str(excinfo.value)
    assert "layer 2 " in message and f"{name} could not be built" in message, message
    assert re.search(r"Expected YAML args \(after the inserted input channels c1[^)]*\): \[c2", message), message
    assert re.search(problem, message), message
    assert_short(excinfo)


def test_repeat_module_expected_args_omit_the_inserted_repeats():
    """For a repeat-role module (C2f_Faster) the parser inserts c1 and the row's n: the hint must not list n."""
    with pytest.raises(ModelYamlError) as excinfo:
        parse([-1, 3, "C2f_Faster", [128, True, 1, "half"]])
    assert re.search(r"Expected YAML args \([^)]*\): \[c2, shortcut, g, e, ", str(excinfo.value)), str(excinfo.value)


# --- channel counts and options a module cannot take ------------------------------------------------------------

# (constructor, kwargs, the argument and fix the ValueError must name), for every module's own arguments and limits
DIRECT_CASES = [
    (SAConv2d, dict(c1=16, c2=32, k=2), r"SAConv2d: k=2 is not valid; .*odd"),
    (SAConv2d, dict(c1=16, c2=32, g=3), r"SAConv2d: g=3 is not valid; groups must divide c1=16 and c2=32"),
    (SAConv2d, dict(c1=16, c2=32, p=0), r"SAConv2d: p=0 is not valid; leave p=None"),
    (SAConv2d, dict(c1=16, c2=32, k=1),
     r"SAConv2d: k=1 is not valid; a 1x1 kernel sees no dilation.*repeat.*use k=3.*stock Conv"),
    (SAConv2d, dict(c1=16, c2=16, deform=1), r"SAConv2d: deform=1 is not valid; use True .* or False"),
    (SAConv2d, dict(c1=16, c2=16, deform="yes"), r"SAConv2d: deform='yes' is not valid; use True .* or False"),
    (ScConv, dict(c1=3, c2=16), r"ScConv: c1=3 is not valid; .*3x3 conv would see 1 squeezed channel.*layer 0"),
    (ScConv, dict(c1=1, c2=16), r"ScConv: c1=1 is not valid; .*>= 2"),
    (ScConv, dict(c1=64, c2=1), r"ScConv: c2=1 is not valid; .*>= 2"),
    (ScConv, dict(c1=16, c2=16, g=2), r"ScConv: g=2 is not valid; use g=1"),
    (ScConv, dict(c1=16, c2=16, alpha=1.0), r"ScConv: alpha=1\.0 is not valid; use a fraction in \(0, 1\)"),
    (ScConv, dict(c1=16, c2=16, alpha=0), r"ScConv: alpha=0 is not valid; use a fraction in \(0, 1\)"),
    (ScConv, dict(c1=16, c2=16, alpha="0.5"), r"ScConv: alpha='0\.5' is not valid; use a fraction in \(0, 1\)"),
    (ScConv, dict(c1=64, c2=64, squeeze=0), r"ScConv: squeeze=0 is not valid; .*integer >= 1"),
    (ScConv, dict(c1=64, c2=64, group_size=0), r"ScConv: group_size=0 is not valid; .*integer >= 1"),
    (ScConv, dict(c1=64, c2=64, gate_threshold=0.0), r"ScConv: gate_threshold=0\.0 is not valid; .*value in \(0, 1\)"),
    (ScConv, dict(c1=64, c2=64, gate_threshold=1.5), r"ScConv: gate_threshold=1\.5 is not valid; .*value in \(0, 1\)"),
    (ScConv, dict(c1=24, c2=16, gn_groups=16), r"ScConv: gn_groups=16 is not valid; it must divide c1=24"),
    (ScConv, dict(c1=64, c2=64, gn_groups=0), r"ScConv: gn_groups=0 is not valid; .*integer >= 1"),
    (DSConv2d, dict(c1=16, c2=32, bits=1), r"DSConv2d: bits=1 is not valid; use an integer from 2 to 8"),
    (DSConv2d, dict(c1=16, c2=32, bits=9), r"DSConv2d: bits=9 is not valid; use an integer from 2 to 8"),
    (DSConv2d, dict(c1=16, c2=32, bits=4.0), r"DSConv2d: bits=4\.0 is not valid; use an integer from 2 to 8"),
    (DSConv2d, dict(c1=16, c2=32, bits=True), r"DSConv2d: bits=True is not valid; use an integer from 2 to 8"),
    (DSConv2d, dict(c1=16, c2=32, block_size=0), r"DSConv2d: block_size=0 is not valid; .*integer >= 1"),
    (DSConv2d, dict(c1=16, c2=32, block_size="32"), r"DSConv2d: block_size='32' is not valid; .*integer >= 1"),
    (DSConv2d, dict(c1=16, c2=32, mode="frozen"), r"DSConv2d: mode='frozen' is not valid; use \"ste\" .* or \"shift\""),
    (DSConv2d, dict(c1=16, c2=32, g=3), r"DSConv2d: g=3 is not valid; groups must divide"),
    (CondConv, dict(c1=16, c2=32, g=3), r"CondConv: g=3 is not valid; groups must divide c1=16 and c2=32"),
    (CondConv, dict(c1=16, c2=32, experts=0), r"CondConv: experts=0 is not valid; .*integer >= 1"),
    (CondConv, dict(c1=16, c2=32, experts=2.5), r"CondConv: experts=2\.5 is not valid; .*integer >= 1"),
    (CondConv, dict(c1=16, c2=32, experts="8"), r"CondConv: experts='8' is not valid; .*integer >= 1"),
    (CondConv, dict(c1=16, c2=32, dropout=1.0), r"CondConv: dropout=1\.0 is not valid; use a rate in \[0, 1\)"),
    (CondConv, dict(c1=16, c2=32, dropout=-0.1), r"CondConv: dropout=-0\.1 is not valid; use a rate in \[0, 1\)"),
    # the Conv geometry arguments, checked by the shared validation (_utils) that every module uses
    (CondConv, dict(c1=16, c2=32, k=0), r"CondConv: k=0 is not valid; .*integer >= 1"),
    (CondConv, dict(c1=16, c2=32, s=1.5), r"CondConv: s=1\.5 is not valid; .*integer >= 1"),
    (CondConv, dict(c1=16, c2=32, p=-1), r"CondConv: p=-1 is not valid; use None \(autopad\) or an integer >= 0"),
    (CondConv, dict(c1=16, c2=32, d=0), r"CondConv: d=0 is not valid; .*integer >= 1"),
    (ODConv, dict(c1=16, c2=32, g=3), r"ODConv: g=3 is not valid; groups must divide c1=16 and c2=32"),
    (ODConv, dict(c1=16, c2=32, p=-1), r"ODConv: p=-1 is not valid; use None \(autopad\) or an integer >= 0"),
    (ODConv, dict(c1=16, c2=32, kernel_num=0), r"ODConv: kernel_num=0 is not valid; .*integer >= 1"),
    (ODConv, dict(c1=16, c2=32, kernel_num=2.0), r"ODConv: kernel_num=2\.0 is not valid; .*integer >= 1"),
    (ODConv, dict(c1=16, c2=32, reduction=0), r"ODConv: reduction=0 is not valid; use a ratio in \(0, 1\]"),
    (ODConv, dict(c1=16, c2=32, reduction=1.5), r"ODConv: reduction=1\.5 is not valid; use a ratio in \(0, 1\]"),
    (ODConv, dict(c1=16, c2=32, reduction="1/16"), r"ODConv: reduction='1/16' is not valid; use a ratio in \(0, 1\]"),
    (ODConv, dict(c1=16, c2=32, temperature=0), r"ODConv: temperature=0 is not valid; use a number > 0"),
    (ODConv, dict(c1=16, c2=32, temperature=True), r"ODConv: temperature=True is not valid; use a number > 0"),
    (ODConv, dict(c1=16, c2=16, temperature=0.5, anneal_epochs=10),
     r"ODConv: temperature=0\.5 is not valid; annealing goes down to 1: start at a temperature >= 1"),
    (ODConv, dict(c1=16, c2=16, anneal_epochs=-1), r"ODConv: anneal_epochs=-1 is not valid; .*integer >= 0"),
    (PConv, dict(c1=32, c2=64), r"PConv: c2=64 is not valid; PConv keeps the channel count: use c2=32"),
    (PConv, dict(c1=32, c2=32, s=2), r"PConv: s=2 is not valid; .*use s=1"),
    (PConv, dict(c1=8, c2=8, n_div=16), r"PConv: n_div=16 is not valid; .*n_div <= c1=8"),
    (PConv, dict(c1=16, c2=16, n_div=0), r"PConv: n_div=0 is not valid; .*integer >= 1"),
    (PConv, dict(c1=32, c2=32, k=2), r"PConv: k=2 is not valid; .*odd k"),
    (FasterBlock, dict(c1=8, c2=8, n_div=16), r"n_div=16 is not valid; .*n_div <= c1=8"),
    (FasterBlock, dict(c1=16, c2=16, mlp_ratio=0), r"FasterBlock: mlp_ratio=0 is not valid; use a number > 0"),
    (FasterBlock, dict(c1=16, c2=16, drop_path=1.0), r"FasterBlock: drop_path=1\.0 is not valid; use a probability"),
    (C2f_Faster, dict(c1=16, c2=32, g=2), r"C2f_Faster: g=2 is not valid; .*use g=1"),
    (C2f_Faster, dict(c1=16, c2=32, e=0.01), r"C2f_Faster: e=0\.01 is not valid; .*int\(c2 \* e\) >= 1"),
    (C2f_Faster, dict(c1=16, c2=32, n=-1), r"C2f_Faster: n=-1 is not valid"),
    (C2f_Faster, dict(c1=16, c2=8, n_div=8), r"n_div=8 is not valid; .*n_div <= c1=4"),  # the blocks see c2 * e
    (AKConv, dict(c1=8, c2=16, num_param=0), r"AKConv: num_param=0 is not valid; .*integer >= 1"),
    (AKConv, dict(c1=8, c2=16, num_param=2.0), r"AKConv: num_param=2\.0 is not valid; .*integer >= 1"),
    (AKConv, dict(c1=8, c2=16, k=2), r"AKConv: k=2 is not valid; .*odd kernel size"),
    (AKConv, dict(c1=8, c2=16, d=2), r"AKConv: d=2 is not valid; .*use d=1"),
    (AKConv, dict(c1=8, c2=16, p=0), r"AKConv: p=0 is not valid; leave p=None"),
    (SPDConv, dict(c1=8, c2=16, k=2), r"SPDConv: k=2 is not valid; .*odd kernel size"),
    (SPDConv, dict(c1=8, c2=16, p=0), r"SPDConv: p=0 is not valid; leave p=None"),
    (SPDConv, dict(c1=8, c2=16, d=2), r"SPDConv: d=2 is not valid; .*use d=1"),
    (DySnakeConv, dict(c1=8, c2=16, k=4), r"DySnakeConv: k=4 is not valid; .*odd kernel size"),
    (DySnakeConv, dict(c1=8, c2=9), r"DySnakeConv: c2=9 is not valid; .*any multiple of 4"),
    (DySnakeConv, dict(c1=8, c2=3), r"DySnakeConv: c2=3 is not valid; .*use c2 >= 4"),
    (DySnakeConv, dict(c1=8, c2=16, extend_scope=0), r"DySnakeConv: extend_scope=0 is not valid; use a number > 0"),
    (DySnakeConv, dict(c1=8, c2=16, g=2), r"DySnakeConv: g=2 is not valid; .*use g=1"),
    (DySnakeConv, dict(c1=8, c2=16, d=2), r"DySnakeConv: d=2 is not valid; .*use d=1"),
    (SPConv, dict(c1=8, c2=16, alpha=1.0), r"SPConv: alpha=1\.0 is not valid; .*in \(0, 1\)"),
    (SPConv, dict(c1=8, c2=16, alpha=0.1), r"SPConv: alpha=0\.1 is not valid; .*0 representative channels"),
    (SPConv, dict(c1=8, c2=16, groups=3), r"SPConv: alpha=0\.5 is not valid; .*divisible by groups=3"),
    (SPConv, dict(c1=8, c2=16, g=2), r"SPConv: g=2 is not valid; .*leave g=1, set groups="),
    (SPConv, dict(c1=8, c2=16, k=2), r"SPConv: k=2 is not valid; .*odd kernel size"),
    (SPConv, dict(c1=8, c2=16, p=0), r"SPConv: p=0 is not valid; leave p=None"),
    (SPConv, dict(c1=8, c2=9), r"SPConv: c2=9 is not valid; it must be divisible by groups=2"),
    (DiverseBranchBlock, dict(c1=8, c2=8, k=2), r"DiverseBranchBlock: k=2 is not valid; use an odd"),
    (DiverseBranchBlock, dict(c1=8, c2=8, p=0), r"DiverseBranchBlock: p=0 is not valid; leave p=None"),
    (DiverseBranchBlock, dict(c1=8, c2=8, g=2), r"DiverseBranchBlock: g=2 is not valid; use g=1"),
    (DiverseBranchBlock, dict(c1=8, c2=8, d=2), r"DiverseBranchBlock: d=2 is not valid; use d=1"),
    (DCNv2, dict(c1=16, c2=16, deformable_groups=3), r"DCNv2: deformable_groups=3 is not valid; it must divide c1=16"),
    (DCNv2, dict(c1=16, c2=16, deformable_groups=0), r"DCNv2: deformable_groups=0 is not valid; .*integer >= 1"),
]


@pytest.mark.parametrize(("cls", "kwargs", "match"), DIRECT_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_impossible_channels_and_options_raise_valueerror_with_fix(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


# (row at layer 2, the argument/fix the error must name): constraints that only the scaled channels reveal
YAML_CHANNEL_CASES = [
    ([-1, 1, "CondConv", [256, 3, 2, None, 3]], r"g=3 is not valid; groups must divide c1=32 and c2=64"),
    ([-1, 1, "SAConv2d", [256, 3, 2, None, 5]], r"g=5 is not valid; groups must divide c1=32 and c2=64"),
    ([-1, 1, "SAConv2d", [256, 1, 1]], r"k=1 is not valid; a 1x1 kernel sees no dilation"),
    ([-1, 1, "DSConv2d", [256, 3, 2, None, 1, 1, True, 9]], r"bits=9 is not valid; use an integer from 2 to 8"),
    ([-1, 1, "DSConv2d", [256, 3, 2, None, 1, 1, True, 4, 0]], r"block_size=0 is not valid"),
    ([-1, 1, "ScConv", [256, 3, 2, None, 1, 1, True, 0.5, 2, 2, 0.5, 5]], r"gn_groups=5 is not valid; .*c1=32"),
    ([-1, 1, "PConv", [256]], r"c2=64 is not valid; PConv keeps the channel count: use c2=32"),
    ([-1, 1, "FasterBlock", [128, 64]], r"n_div=64 is not valid; .*n_div <= c1=32"),
    ([-1, 3, "C2f_Faster", [128, True, 2]], r"g=2 is not valid; .*use g=1"),
]


@pytest.mark.parametrize(("row", "match"), YAML_CHANNEL_CASES, ids=lambda v: str(v[2]) if isinstance(v, list) else "")
def test_impossible_channels_through_yaml_name_layer_and_fix(row, match):
    with pytest.raises(ModelYamlError, match=rf"layer 2 .*{row[2]} could not be built.*{match}") as excinfo:
        parse(row)
    assert isinstance(excinfo.value.original, ValueError)
    assert_short(excinfo)


# --- imgsz 32 and batch 1 for every model YAML --------------------------------------------------------------


BN_ONE_VALUE = "Expected more than 1 value per channel when training"


def _batch1_train_error(model, imgsz):
    """The exception of a training-mode forward of one image, or None."""
    model.train()
    try:
        model(torch.rand(1, 3, imgsz, imgsz))
    except Exception as e:  # noqa: BLE001  (compared with stock below)
        return e
    return None


@pytest.fixture(scope="module")
def stock_batch1_errors():
    return {
        f: str(_batch1_train_error(DetectionModel(f"{f}n.yaml", verbose=False), 32))
        for f in sorted({family(p) for p in MODEL_YAMLS})
    }


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: p.stem)
def test_imgsz32_and_batch1_like_stock(path, stock_batch1_errors):
    """imgsz 32 (1x1 maps at P5) works in eval and training (batch 2). Training with one image at imgsz 32 fails in
    stock YOLO too (BatchNorm over one value per channel); ours fails the same way or works, never worse. From
    imgsz 64 on, a training batch of one works."""
    model = DetectionModel(scaled(path), verbose=False)
    model.eval()
    with torch.no_grad():
        for b in (1, 2):
            y = model(torch.rand(b, 3, 32, 32))[0]
            assert y.shape == (b, 84, 16 + 4 + 1) and torch.isfinite(y).all()
    model.train()
    feats = train_feats(model(torch.rand(2, 3, 32, 32)))
    assert [f.shape[-1] for f in feats] == [4, 2, 1]
    error = _batch1_train_error(model, 32)
    stock = stock_batch1_errors[family(path)]
    assert stock.startswith(BN_ONE_VALUE), stock  # what stock YOLO does: if it ever works, so must ours
    assert error is None or (isinstance(error, ValueError) and str(error).startswith(BN_ONE_VALUE)), (error, stock)
    assert _batch1_train_error(model, 64) is None


# --- unknown module names -----------------------------------------------------------------------------------------

TYPOS = {
    "SCConv": "ScConv",  # the paper's spelling
    "scconv": "ScConv",
    "SAConv": "SAConv2d",
    "saconv2d": "SAConv2d",
    "DSConv": "DSConv2d",
    "DSConv2D": "DSConv2d",
    "CondConv2d": "CondConv",
    "Condconv": "CondConv",
    "C2fFaster": "C2f_Faster",
    "C2f_faster": "C2f_Faster",
    "FasterNetBlock": "FasterBlock",
    "PConv2d": "PConv",
    "PartialConv": "PConv",
}


@pytest.mark.parametrize(("typo", "meant"), TYPOS.items())
def test_misspelt_module_names_suggest_ours(typo, meant):
    """In the backbone and in the head (the layer index counts across both)."""
    with pytest.raises(ModelYamlError, match=rf"layer 2 .*unknown module '{typo}'\. Did you mean .*\b{meant}\b"):
        parse([-1, 1, typo, [128]])
    d = yaml_dict(VALID_ROWS["SAConv2d"])
    d["head"] = [[-1, 1, "Conv", [64, 3, 1]], [-1, 1, typo, [128]]]
    with pytest.raises(ModelYamlError, match=rf"layer 4 .*unknown module '{typo}'\. Did you mean .*\b{meant}\b"):
        parse_model(d, ch=3, verbose=False)


def test_unknown_module_without_close_name_explains_registration():
    with pytest.raises(ModelYamlError, match=r"layer 2 .*unknown module 'Xyzzy'\. Your own module: .*register") as e:
        parse([-1, 1, "Xyzzy", [128]])
    assert "Did you mean" not in str(e.value)


def test_bad_yaml_file_through_yolo_names_layer(tmp_path):
    """The user path: a YAML file given to YOLO(); the error is ours, not a KeyError from Ultralytics' globals()."""
    from ultralytics import YOLO

    text = (Path(MODEL_YAMLS[0]).parent / "yolov8-condconv.yaml").read_text()
    text = text.replace("CondConv, [1024", "CondConv2d, [1024")
    bad = tmp_path / "yolov8n-typo.yaml"
    bad.write_text(text)
    with pytest.raises(ModelYamlError, match=r"layer 7 .*unknown module 'CondConv2d'\. Did you mean CondConv"):
        YOLO(str(bad))


# --- an Ultralytics outside the supported range ------------------------------------------------------------------


def fake_tasks(parse_model_source: str | None = None, **extra) -> types.ModuleType:
    """A copy of ``ultralytics.nn.tasks``' namespace with an unpatched ``parse_model`` (optionally rewritten)."""
    fake = types.ModuleType("fake_tasks")
    vars(fake).update({k: v for k, v in vars(tasks).items() if k not in ("__name__", "__spec__", "__loader__")})
    vars(fake).update(extra)
    original = tasks.parse_model.__wrapped__
    if parse_model_source is None:
        fake.parse_model = original
    else:
        exec(compile(parse_model_source, inspect.getsourcefile(original), "exec"), vars(fake))
    return fake


STOCK_ROWS = {"backbone": [[-1, 1, "Conv", [64, 3, 2]], [-1, 1, "Conv", [128, 3, 2]]], "head": []}


@pytest.mark.parametrize("version", ["8.2.103", "8.5.0", "9.0.0"])
def test_version_outside_range_with_known_parser_warns_and_works(version, monkeypatch, capsys):
    monkeypatch.setattr(integration, "ultralytics_version", lambda: version)
    fake = fake_tasks()
    integration.patch_tasks(fake)
    err = capsys.readouterr().err
    assert f"Ultralytics {version} is outside the tested range >=8.3.0,<8.5" in err
    layers, _ = fake.parse_model(yaml_dict(VALID_ROWS["CondConv"]), 3, False)
    assert isinstance(layers[2], CondConv)


def test_refactored_parse_model_is_refused_but_stock_models_still_build(monkeypatch):
    """A future parse_model that keeps its module sets elsewhere (here: a module-level constant) is not
    recognised: our YAMLs get UnsupportedUltralyticsError naming version, range and fix; stock YAMLs still build."""
    monkeypatch.setattr(integration, "ultralytics_version", lambda: "8.5.0")
    source = inspect.getsource(tasks.parse_model.__wrapped__)
    if "base_modules = frozenset(" not in source:
        pytest.skip("this Ultralytics writes its module sets inline (8.3.0-era); the refactor targets base_modules")
    source = source.replace("base_modules = frozenset(", "base_modules = _BASE_MODULES(", 1)
    source = source.replace("repeat_modules = frozenset(", "repeat_modules = _BASE_MODULES(", 1)
    fake = fake_tasks(source, _BASE_MODULES=frozenset)
    with pytest.raises(yolo_convplug.UnsupportedUltralyticsError, match=r"Ultralytics 8\.5\.0: parse_model's shape"):
        integration.patch_tasks(fake)
    match = (
        r"Ultralytics 8\.5\.0.*Supported Ultralytics: >=8\.3\.0,<8\.5\. Fix: pip install 'ultralytics>=8\.3\.0,<8\.5'"
    )
    with pytest.raises(yolo_convplug.UnsupportedUltralyticsError, match=match):
        fake.parse_model(yaml_dict(VALID_ROWS["ScConv"]), 3, False)
    layers, _ = fake.parse_model(copy.deepcopy(STOCK_ROWS), 3, False)
    assert [type(m).__name__ for m in layers] == ["Conv", "Conv"]


def test_parse_model_without_source_is_refused(monkeypatch):
    """An install without .py sources (only bytecode) cannot be rewritten: a clear error, not an OSError."""
    fake = fake_tasks()
    namespace: dict = {}
    exec(compile("def parse_model(d, ch, verbose=True):\n    return d\n", "<compiled-only>", "exec"), namespace)
    fake.parse_model = namespace["parse_model"]
    with pytest.raises(yolo_convplug.UnsupportedUltralyticsError, match=r"source of parse_model is unavailable"):
        integration.patch_tasks(fake)
