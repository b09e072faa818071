"""Calibrated warm start: plug-in layers without an exact conversion are fitted to the stock layer at their index,
exactly converted layers stay bit-identical, and ``yolo train ... pretrained=<stock .pt>`` calibrates before the
first epoch (``YOLO_CONVPLUG_CALIBRATE=0`` skips it)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import CFG_MODELS, run_cli, scaled
from module_checks import norm_rel_err, randomize_
from ultralytics import YOLO
from ultralytics.nn.tasks import DetectionModel, yaml_model_load

import yolo_convplug
from yolo_convplug.calibrate import DIVERGENCE_CHECK, fit_layer, layer_io, reestimate_bn, relative_error
from yolo_convplug.research.data import make_shapes

PREFIX = "yolo-convplug calibration: "
LINE = re.compile(r"layer (\d+) (\w+): calibrated, error (\d+\.\d+) -> (\d+\.\d+) \((\d+) images, (\d+) steps, "
                  r"\d+\.\d s\)")


def stock_model() -> DetectionModel:
    return randomize_(DetectionModel("yolov8n.yaml", nc=4, verbose=False), seed=5).eval()


def mixed_yaml() -> dict:
    """yolov8n-c2f-faster (approximate C2f_Faster layers) with layer 7 a ConvControl (exact conversion)."""
    d = copy.deepcopy(yaml_model_load(scaled(CFG_MODELS / "yolov8-c2f-faster.yaml")))
    d["backbone"][7] = [-1, 1, "ConvControl", [1024, 3, 2]]
    return d


def images() -> torch.Tensor:
    """A smooth random batch in [0, 1] (upsampled noise), closer to images than white noise."""
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.interpolate(torch.rand(4, 3, 16, 16, generator=g), size=64, mode="bilinear")


def layer_error(stock, model, i, x) -> float:
    """Layer ``i``'s relative output error against the stock layer on the stock layer's own input."""
    seen = {}
    h = stock.model[i].register_forward_hook(lambda m, a, y: seen.update(x=a[0], y=y))
    with torch.no_grad():
        stock(x)
        h.remove()
        return norm_rel_err(model.model[i].eval()(seen["x"]), seen["y"])


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "stock-inputs"])
def test_calibration_lowers_each_fitted_layers_error_and_leaves_the_rest_bit_identical(sequential):
    stock = stock_model()
    model = DetectionModel(mixed_yaml(), nc=4, verbose=False)
    model.load(stock, verbose=False)
    outcomes = {r["layer"]: r["outcome"] for r in model._convplug_warm_start}
    assert outcomes[7] == "exact"
    fitted = [i for i, o in outcomes.items() if o == "approximate"]
    assert fitted == [2, 4, 6, 8, 12, 15, 18, 21]
    x = images()
    before = {i: layer_error(stock, model, i, x) for i in fitted}
    state = copy.deepcopy(model.state_dict())

    lines = yolo_convplug.calibrate(model, stock, x, steps=20, lr=3e-3, sequential=sequential)

    assert [int(LINE.fullmatch(line).group(1)) for line in lines] == fitted, lines
    records = {r["layer"]: r for r in model._convplug_warm_start}
    for i in fitted:
        after = layer_error(stock, model, i, x)  # on the stock layer's input: what the stock-inputs mode fits
        assert after < (0.8 if not sequential else 1.0) * before[i], (i, before[i], after)
        assert records[i]["outcome"] == "calibrated" and records[i]["calibration"]["kept"]
        fit = records[i]["calibration"]  # on the input the fit used
        assert fit["error_after"] < 0.8 * fit["error_before"], (i, fit)
    assert records[7]["outcome"] == "exact"
    for k, v in model.state_dict().items():
        if not k.startswith(tuple(f"model.{i}." for i in fitted)):
            assert torch.equal(v, state[k]), k


def test_sequential_calibration_fits_each_layer_on_the_input_the_calibrated_model_gives_it():
    """The single forward that fits each layer as its input arrives gives every layer the input of the model whose
    earlier layers are already calibrated: its recorded error is its error on that input after calibration."""
    stock = stock_model()
    model = DetectionModel(mixed_yaml(), nc=4, verbose=False)
    model.load(stock, verbose=False)
    x = images()
    yolo_convplug.calibrate(model, stock, x, steps=5, lr=3e-3)
    fitted = [r for r in model._convplug_warm_start if "calibration" in r]
    indices = [r["layer"] for r in fitted]
    assert indices == [2, 4, 6, 8, 12, 15, 18, 21]
    inputs, targets = layer_io(model, indices, x), layer_io(stock, indices, x)
    for r in fitted:
        i = r["layer"]
        if i != indices[0]:  # the layers before the first one are the stock model's
            assert not torch.equal(inputs[i][0], targets[i][0])  # the model's own input, not the stock layer's
        error = relative_error(model.model[i], inputs[i][0], targets[i][1])
        assert error == pytest.approx(r["calibration"]["error_after"], rel=1e-5), i


def test_steps_default_to_each_layers_class_and_an_explicit_count_overrides_them(monkeypatch):
    """Without ``steps`` a layer gets its class's ``calibration_steps`` (C2f_Faster sets one), else DEFAULT_STEPS
    (ScConv); ``steps=N`` applies to every layer. Both are shrunk here so the test stays fast."""
    from yolo_convplug.modules.faster import C2f_Faster

    monkeypatch.setattr(C2f_Faster, "calibration_steps", 3)
    monkeypatch.setattr(yolo_convplug.calibrate, "DEFAULT_STEPS", 2)
    stock = stock_model()
    for yaml, default in (("yolov8-c2f-faster.yaml", "3"), ("yolov8-scconv.yaml", "2")):
        for steps, expected in ((None, default), (4, "4")):
            model = DetectionModel(scaled(CFG_MODELS / yaml), nc=4, verbose=False)
            model.load(stock, verbose=False)
            lines = yolo_convplug.calibrate(model, stock, images(), steps=steps, lr=3e-3)
            assert lines and all(LINE.fullmatch(line).group(6) == expected for line in lines), (yaml, steps, lines)
            assert {r["calibration"]["steps"] for r in model._convplug_warm_start if "calibration" in r} == {
                int(expected)}


def test_a_layer_whose_error_grows_is_restored_and_the_line_says_so():
    stock = stock_model()
    model = DetectionModel(scaled(CFG_MODELS / "yolov8-c2f-faster.yaml"), nc=4, verbose=False)
    model.load(stock, verbose=False)
    state = copy.deepcopy(model.state_dict())
    lines = yolo_convplug.calibrate(model, stock, images(), steps=3, lr=50.0, layers=[2])  # diverges
    assert len(lines) == 1 and "did not lower its error" in lines[0] and "left as it was" in lines[0], lines
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert next(r for r in model._convplug_warm_start if r["layer"] == 2)["outcome"] == "approximate"


def fitted_c2f_faster_layer():
    """Layer 2 of a c2f-faster model loaded from the random stock model, its stock input and output, and a list
    that counts the layer's forward calls with autograd on (the fit's steps; error measurements run without)."""
    stock = stock_model()
    model = DetectionModel(scaled(CFG_MODELS / "yolov8-c2f-faster.yaml"), nc=4, verbose=False)
    model.load(stock, verbose=False)
    steps = []
    model.model[2].register_forward_hook(lambda m, a, y: steps.append(torch.is_grad_enabled()))
    return stock, model, *layer_io(stock, [2], images())[2], steps


@pytest.mark.parametrize(("lr", "converges", "expected_steps"), [(3e-3, True, 60), (500.0, False, DIVERGENCE_CHECK)],
                         ids=["converging", "diverging"])
def test_a_diverging_fit_gives_up_at_the_check_and_a_converging_one_runs_all_its_steps(lr, converges,
                                                                                       expected_steps):
    _, model, x, y, steps = fitted_c2f_faster_layer()
    layer = model.model[2]
    start = relative_error(layer, x, y)
    assert fit_layer(layer, x, y, 60, lr, start_loss=start**2) is converges
    assert sum(steps) == expected_steps
    assert (relative_error(layer, x, y) < start) is converges


def test_calibrate_stops_a_diverging_fit_early_retries_it_at_a_tenth_of_the_rate_then_restores_the_layer():
    stock, model, *_, steps = fitted_c2f_faster_layer()
    state = copy.deepcopy(model.state_dict())
    lines = yolo_convplug.calibrate(model, stock, images(), steps=200, lr=500.0, layers=[2])  # 50 diverges too
    assert sum(steps) == 2 * DIVERGENCE_CHECK  # not 2 x 200: each attempt stopped at the check
    assert len(lines) == 1 and "did not lower its error" in lines[0] and "left as it was" in lines[0], lines
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_exactly_converted_model_is_not_touched():
    stock = stock_model()
    model = DetectionModel(scaled(CFG_MODELS / "yolov8-control.yaml"), nc=4, verbose=False)
    model.load(stock, verbose=False)
    assert [r["outcome"] for r in model._convplug_warm_start] == ["exact"] * 3
    state = copy.deepcopy(model.state_dict())
    assert yolo_convplug.calibrate(model, stock, images()) == []
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    x = images()
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[0], stock(x)[0])  # the control computes the stock model


def test_bn_reestimation_keeps_the_eval_function_and_sets_the_batch_statistics():
    torch.manual_seed(0)
    layer = randomize_(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)), seed=1).eval()
    x = torch.randn(6, 3, 10, 10) * 2 + 1
    with torch.no_grad():
        y = layer(x)
        z = layer[0](x)
    reestimate_bn(layer, x)
    bn = layer[1]
    torch.testing.assert_close(bn.running_mean, z.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, z.var((0, 2, 3), unbiased=True))
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), y, rtol=1e-5, atol=1e-5)
    assert bn.momentum == 0.1


@pytest.mark.parametrize("bad", [torch.rand(3, 64, 64), torch.zeros(2, 3, 64, 64, dtype=torch.uint8),
                                 torch.rand(2, 1, 64, 64)], ids=["3d", "uint8", "1-channel"])
def test_bad_images_are_refused_before_any_work(bad):
    stock = stock_model()
    model = DetectionModel(scaled(CFG_MODELS / "yolov8-scconv.yaml"), nc=4, verbose=False)
    model.load(stock, verbose=False)
    with pytest.raises(ValueError, match=r"calibrate: images must be a float \(B, 3, H, W\) batch"):
        yolo_convplug.calibrate(model, stock, bad)
    with pytest.raises(ValueError, match=r"calibrate: steps=0 is not valid"):
        yolo_convplug.calibrate(model, stock, images(), steps=0)


@pytest.fixture(scope="module")
def tiny_stock(tmp_path_factory):
    """A stock yolov8n trained 1 epoch at imgsz 64 on a tiny shapes set, and that set's data YAML."""
    root = tmp_path_factory.mktemp("calib")
    data = make_shapes("shapes:train=16,val=8,imgsz=64", root=root / "shapes")
    YOLO("yolov8n.yaml").train(data=str(data), epochs=1, imgsz=64, batch=8, workers=0, device="cpu", plots=False,
                               val=False, project=str(root), name="stock", verbose=False)
    return root / "stock" / "weights" / "last.pt", data


@pytest.mark.slow
@pytest.mark.parametrize("enabled", [True, False], ids=["calibrates", "YOLO_CONVPLUG_CALIBRATE=0"])
def test_cli_train_from_stock_checkpoint_calibrates_before_the_first_epoch(enabled, tiny_stock, tmp_path):
    weights, data = tiny_stock
    env = {"YOLO_CONVPLUG_CALIBRATE_STEPS": "5", "YOLO_CONVPLUG_CALIBRATE_IMAGES": "4"}
    if not enabled:
        env["YOLO_CONVPLUG_CALIBRATE"] = "0"
    result = run_cli(["train", "model=yolov8n-scconv.yaml", f"pretrained={weights}", f"data={data}", "epochs=1",
                      "imgsz=64", "batch=4", "workers=0", "device=cpu", "plots=False", "val=False",
                      f"project={tmp_path}", "name=run"], env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    lines = [line.split(PREFIX, 1)[1] for line in out.splitlines() if PREFIX in line]
    if not enabled:
        assert lines == []
        return
    layers = [3, 5, 7, 16, 19]  # the ScConv layers of yolov8-scconv.yaml
    assert [int(LINE.fullmatch(line).group(1)) for line in lines if LINE.fullmatch(line)] == layers, lines
    assert all(LINE.fullmatch(line).group(5, 6) == ("4", "5") for line in lines)
    assert out.index(PREFIX) > out.index("yolo-convplug warm start: layer 19 ScConv")  # after the load summary
    assert out.index(PREFIX) < out.index("Starting training")


@pytest.mark.slow
def test_warm_start_check_reports_the_calibrated_start_reproducibly_per_seed(tiny_stock, capsys):
    """``scripts/warm_start_check.py --calibrate-steps N --seed S``: one row per model with its calibrated mAP and
    one calibration line per fitted layer; the same seed gives the same table (the initialisation is seeded)."""
    from yolo_convplug.research import conversion

    weights, data = tiny_stock
    args = [str(weights), "yolov8n-c2f-faster.yaml", "--data", str(data), "--imgsz", "64", "--calibrate-steps", "3",
            "--calibrate-images", "4", "--seed", "1"]

    def table() -> list[str]:
        assert conversion.main(args) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| yolov8n", "yolov8n"))]

    first = table()
    row = next(line for line in first if line.startswith("| yolov8n-c2f-faster |"))
    assert len(row.split("|")) == 9, row  # model, loaded, vs stock, calibrated, vs stock, seconds, layer errors
    fitted = [line for line in first if line.startswith("yolov8n-c2f-faster: layer ")]
    assert [int(re.search(r"layer (\d+) C2f_Faster: ", line).group(1)) for line in fitted] == [2, 4, 6, 8, 12, 15,
                                                                                               18, 21], fitted
    assert all(re.search(r"4 images, 3 steps, ", line) for line in fitted), fitted  # kept or not, each says so
    strip = re.compile(r"\d+\.\d s\)|\| \d+\.\d \|")  # timings differ between runs
    assert [strip.sub("", line) for line in table()] == [strip.sub("", line) for line in first]
