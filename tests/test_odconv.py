"""ODConv's own math: the batched module against a per-sample reference written from the paper, BN folding and ONNX at
another batch size for groups, dilation, padding, even and 1x1 kernels and one kernel, warm start from a stock Conv, the
attention's BN at batch 1, the temperature schedule. Generic checks (shapes, gradients, batch independence, fuse and
ONNX of the default geometry, trace, autocast) live in test_contract.py, bad constructor arguments in
test_bad_input.py."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from module_checks import onnx_outputs, random_stock_conv, randomize_, rel_err
from ultralytics.nn.modules.conv import Conv

from yolo_convplug import ConversionError
from yolo_convplug.modules.odconv import ODConv

# (c1, c2, k, s, p, g, d, kernel_num): groups, depth-wise, dilation, explicit padding, even and 1x1 kernels, n = 1
VARIANTS = [(16, 32, 3, 2, None, 1, 1, 4), (8, 16, 3, 1, None, 2, 2, 4), (24, 24, 5, 2, 1, 8, 1, 2),
            (8, 8, 2, 1, None, 1, 1, 3), (32, 32, 1, 1, None, 1, 1, 1), (16, 16, 3, 1, None, 16, 1, 4)]


def randomize(m: torch.nn.Module) -> torch.nn.Module:
    """``module_checks.randomize_`` (BN statistics and affine) and non-trivial attention heads, so every attention
    matters."""
    randomize_(m)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("attn_"):
                p.normal_(0, 0.5)
    return m


def batch_norm(y, bn, training):
    """BN written out: batch statistics (biased variance) in training, running statistics in eval."""
    dims = [0] + list(range(2, y.dim()))
    mean, var = (y.mean(dims), y.var(dims, unbiased=False)) if training else (bn.running_mean, bn.running_var)
    shape = (1, -1) + (1,) * (y.dim() - 2)
    return (y - mean.view(shape)) / (var.view(shape) + bn.eps).sqrt() * bn.weight.view(shape) + bn.bias.view(shape)


def reference(m: ODConv, x: torch.Tensor) -> torch.Tensor:
    """ODConv one sample at a time, from the paper: the four attentions of the sample, its kernel
    ``sum_i a_w_i a_s ⊙ W_i`` with ``a_c`` applied to the input and ``a_f`` to the output (as the reference code does,
    equal to scaling the kernel's input and output channels), the convolution, then BN and SiLU over the batch."""
    c1, c2, k, g, n = m.c1, m.c2, m.k, m.g, m.weight.shape[0]
    z = F.relu(batch_norm(x.mean((2, 3)) @ m.fc.weight.T, m.fc_bn, m.training))
    bank = m.weight.view(n, c2, c1 // g, k, k)
    outs = []
    for b in range(x.shape[0]):
        def head(fc, zb=z[b]):
            return (zb @ fc.weight.T + fc.bias) / m.temperature
        # the official structure: no spatial attention for a 1x1 kernel, no filter attention depth-wise
        a_s = 2 * torch.sigmoid(head(m.attn_spatial)).view(k, k) if k > 1 else torch.ones(1, 1)
        a_c = 2 * torch.sigmoid(head(m.attn_in))
        a_f = torch.ones(c2) if c1 == g == c2 else 2 * torch.sigmoid(head(m.attn_out))
        a_w = torch.softmax(head(m.attn_kernel), 0) if n > 1 else torch.ones(1)
        kernel = sum(a_w[i] * a_s * bank[i] for i in range(n))
        y = F.conv2d(x[b : b + 1] * a_c.view(1, c1, 1, 1), kernel, None, m.s, m.p, m.d, g)
        outs.append(y * a_f.view(1, c2, 1, 1))
    return F.silu(batch_norm(torch.cat(outs), m.bn, m.training))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("c1, c2, k, s, p, g, d, n", VARIANTS)
def test_matches_per_sample_reference(c1, c2, k, s, p, g, d, n, train):
    torch.manual_seed(0)
    m = randomize(ODConv(c1, c2, k, s, p, g, d, kernel_num=n, temperature=1.5)).train(train)
    x = torch.randn(4, c1, 12, 12, requires_grad=True)
    y, expected = m(x), reference(m, x)
    assert rel_err(y, expected) < 1e-5
    g = torch.randn_like(y)  # the gradients too: the per-sample convolution has its own backward
    params = [p for p in m.parameters() if p.requires_grad]
    for grad, grad_ref in zip(torch.autograd.grad(y, [x, *params], g),
                              torch.autograd.grad(expected, [x, *params], g, allow_unused=True)):
        assert rel_err(grad, grad_ref) < 1e-4  # float32 sums over every pixel: measured up to 1.3e-5


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(("k", "s", "n"), [(3, 2, 2), (1, 1, 1)])  # 1x1 with one kernel: no per-sample kernel factor
@pytest.mark.parametrize("placement", [(False, False), (True, False), (False, True), (True, True)])
def test_channel_attentions_on_maps_or_kernels_match_the_reference(placement, k, s, n, train, monkeypatch):
    """a_c on the input map or the kernels, a_f on the output map or the kernels: each placement is the paper's
    ODConv, in the output and the gradients, plain, fused and exported at other batch sizes."""
    torch.manual_seed(0)
    m = randomize(ODConv(64, 64, k, s, kernel_num=n)).train(train)
    monkeypatch.setattr(m, "placement", lambda x: placement)
    x = torch.randn(3, 64, 6, 6, requires_grad=True)
    y, expected = m(x), reference(m, x)
    assert rel_err(y, expected) < 1e-5
    g = torch.randn_like(y)
    for grad, grad_ref in zip(torch.autograd.grad(y, [x, *m.parameters()], g),
                              torch.autograd.grad(expected, [x, *m.parameters()], g)):
        assert rel_err(grad, grad_ref) < 1e-5
    if not train:
        with torch.no_grad():
            assert rel_err(m.fuse()(x), expected) < 1e-5
        for y, expected in onnx_outputs(m, x[:2].detach()):
            assert rel_err(y, expected) < 1e-5


@pytest.mark.parametrize(("c1", "c2", "k", "s", "size", "placement"), [
    (64, 64, 3, 1, 80, (False, False)),  # large map: both on the kernels
    (64, 64, 3, 2, 4, (False, True)),  # strided: the output map is the smallest
    (16, 64, 3, 1, 8, (True, False)),  # few input channels: the input map
    (64, 64, 1, 1, 4, (True, True)),  # 1x1 on a small map: the kernels keep no attention
])
def test_attentions_go_where_they_cost_fewest_multiplies(c1, c2, k, s, size, placement):
    m = ODConv(c1, c2, k, s, kernel_num=1)
    assert m.placement(torch.zeros(2, c1, size, size)) == placement


@pytest.mark.parametrize(("c1", "c2", "k", "g", "spatial", "filter_"),
                         [(16, 16, 1, 1, False, True), (16, 16, 3, 16, True, False), (16, 16, 1, 16, False, False),
                          (16, 32, 3, 16, True, True), (16, 16, 3, 1, True, True)])
def test_heads_follow_the_official_structure(c1, c2, k, g, spatial, filter_):
    """As the official ODConv: a 1x1 kernel has no spatial head, a depth-wise conv (c1 = g = c2) no filter head; a
    grouped conv with c2 != c1 keeps it."""
    m = ODConv(c1, c2, k, g=g)
    assert (m.attn_spatial is not None) == spatial and (m.attn_out is not None) == filter_
    assert m.attn_in is not None


def test_attentions_differ_per_sample_and_have_their_ranges():
    m = randomize(ODConv(16, 32, 3, kernel_num=4)).eval()
    a_s, a_c, a_f, a_w = m.attentions(torch.randn(2, 16, 8, 8))
    assert (a_s.shape, a_c.shape, a_f.shape, a_w.shape) == ((2, 9), (2, 16), (2, 32), (2, 4))
    assert all(((a > 0) & (a < 2)).all() for a in (a_s, a_c, a_f))
    torch.testing.assert_close(a_w.sum(1), torch.ones(2))
    assert not torch.allclose(a_w[0], a_w[1]) and not torch.allclose(a_f[0], a_f[1])


def test_training_with_a_batch_of_one_uses_running_attention_statistics():
    torch.manual_seed(0)
    m = randomize(ODConv(16, 16, 3)).train()
    before = m.fc_bn.running_mean.clone()
    x = torch.randn(1, 16, 8, 8)
    y = m(x)
    y.sum().backward()
    assert torch.equal(m.fc_bn.running_mean, before)
    m.fc_bn.eval()  # the attention's BN in eval, the output BN still on batch statistics: the same computation
    torch.testing.assert_close(y, m(x))


@pytest.mark.parametrize("c1, c2, k, s, p, g, d, n", VARIANTS)
def test_fuse_is_exact(c1, c2, k, s, p, g, d, n):
    torch.manual_seed(0)
    m = randomize(ODConv(c1, c2, k, s, p, g, d, kernel_num=n)).eval()
    x = torch.randn(3, c1, 10, 10)
    with torch.no_grad():
        before = m(x)
        assert m.fuse() is m and not hasattr(m, "bn")
        assert rel_err(m(x), before) < 1e-5


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("c1, c2, k, s, p, g, d, n", [VARIANTS[1], VARIANTS[4]])
def test_onnx_runs_at_any_batch_size(c1, c2, k, s, p, g, d, n, fuse):
    """Exported at batch 2, run at batches 1 and 3: no batch-size constant in the graph, with groups and dilation, and
    with a 1x1 kernel and one kernel (no spatial and no kernel attention; the contract exports the default geometry)."""
    torch.manual_seed(0)
    m = randomize(ODConv(c1, c2, k, s, p, g, d, kernel_num=n)).eval()
    if fuse:
        m.fuse()
    for y, expected in onnx_outputs(m, torch.randn(2, c1, 16, 16)):
        assert rel_err(y, expected) < 1e-4


@pytest.mark.parametrize("c1, c2, k, s, p, g, d, n", VARIANTS)
def test_converts_exactly_from_conv_without_noise(c1, c2, k, s, p, g, d, n):
    torch.manual_seed(0)
    conv = random_stock_conv(c1, c2, k, s, g=g, d=d, p=p)
    m = randomize(ODConv(c1, c2, k, s, p, g, d, kernel_num=n))  # every tensor is set, whatever it held
    assert m.convert_from(conv, noise=0) == f"{n} kernels = W, attentions neutral"
    m.eval()
    x = torch.randn(3, c1, 12, 12)
    with torch.no_grad():
        assert rel_err(m(x), conv(x)) < 1e-5
        a_s, a_c, a_f, a_w = m.attentions(x)
    assert all(a is None or torch.equal(a, torch.ones_like(a)) for a in (a_s, a_c, a_f))
    assert a_w is None or torch.allclose(a_w, torch.full_like(a_w, 1 / n), rtol=1e-6, atol=0)


def test_default_noise_keeps_the_output_and_lets_the_kernels_diverge():
    """Identical kernels give the kernel attention a zero gradient forever; the default noise breaks the tie."""
    torch.manual_seed(0)
    conv = random_stock_conv(32, 64, 3, 2)
    x = torch.randn(4, 32, 12, 12)
    grads = {}
    for noise in (0.0, 0.01):
        m = ODConv(32, 64, 3, 2)
        text = m.convert_from(conv, noise=noise)
        assert ("1% noise" in text) == bool(noise)
        with torch.no_grad():
            assert rel_err(m.eval()(x), conv(x)) < (0.05 if noise else 1e-5)
        m.train()(x).square().mean().backward()
        grads[noise] = m.attn_kernel.weight.grad.abs().max().item()
    assert grads[0.0] == 0 and grads[0.01] > 0
    assert ODConv(32, 64, 3, 2).convert_from(conv) == "4 kernels = W + 1% noise, attentions neutral"


def test_conversion_refuses_a_fused_conv():
    stock = Conv(16, 32, 3, 2)
    del stock.bn
    with pytest.raises(ConversionError, match="fused"):
        ODConv(16, 32, 3, 2).convert_from(stock)


def test_bad_noise_raises_value_error():
    with pytest.raises(ValueError, match=r"ODConv: noise=-0\.1"):
        ODConv(16, 32).convert_from(Conv(16, 32, 3), noise=-0.1)


# --- the official temperature schedule -----------------------------------------------------------------------------


def test_annealed_temperature_falls_linearly_to_one_over_its_epochs():
    """The official schedule (30 -> 1 over 10 epochs), by epoch; without anneal_epochs the temperature is fixed."""
    m = ODConv(16, 16, temperature=30.0, anneal_epochs=10)
    seen = []
    for epoch in (0, 1, 5, 9, 10, 25):
        m.set_train_epoch(epoch)
        seen.append(m.current_temperature())
    assert seen == pytest.approx([30.0, 27.1, 15.5, 3.9, 1.0, 1.0])
    assert ODConv(16, 16, temperature=2.0).current_temperature() == 2.0
    with pytest.raises(ValueError, match=r"ODConv: temperature=0.5 is not valid; annealing goes down to 1"):
        ODConv(16, 16, temperature=0.5, anneal_epochs=10)
    with pytest.raises(ValueError, match=r"ODConv: anneal_epochs=-1 is not valid"):
        ODConv(16, 16, anneal_epochs=-1)


def test_the_temperature_divides_every_logit():
    """At epoch 0 the module computes what the fixed-temperature module of T = 30 computes (same weights)."""
    torch.manual_seed(0)
    annealed = randomize(ODConv(16, 32, 3, 2, temperature=30.0, anneal_epochs=10)).eval()
    fixed = ODConv(16, 32, 3, 2, temperature=30.0).eval()
    fixed.load_state_dict({k: v for k, v in annealed.state_dict().items() if k != "epoch"})
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        assert torch.equal(annealed(x), fixed(x))
        annealed.epoch.fill_(10)
        fixed.temperature = 1.0
        assert torch.equal(annealed(x), fixed(x))


def test_yolo_train_cli_anneals_the_saved_model(tmp_path):
    """A fresh ``yolo train`` process (the module file is imported only while the model is built, after the trainer
    took Ultralytics' default callbacks) of yolov8-odconv with the schedule (9th-10th YAML arguments), 2 epochs: the
    saved last.pt (the EMA copy) has every ODConv at epoch 1, i.e. T = 1 + 29 * (1 - 1/10) = 27.1."""
    from conftest import CFG_MODELS, run_cli

    from yolo_convplug.research.data import make_shapes

    text = (CFG_MODELS / "yolov8-odconv.yaml").read_text()
    rows = text.count("ODConv, [")
    text = re.sub(r"(ODConv, \[\d+, 3, 2)\]\]", r"\1, None, 1, 1, True, 4, 0.0625, 30.0, 10]]", text)
    assert text.count("30.0, 10]]") == rows > 0
    path = tmp_path / "yolov8n-odconv-annealed.yaml"
    path.write_text(text)
    data = make_shapes("shapes:train=8,val=4,imgsz=64", root=tmp_path / "shapes")
    result = run_cli(["train", f"model={path}", f"data={data}", "epochs=2", "imgsz=64", "batch=4", "workers=0",
                      "device=cpu", "plots=False", "val=False", f"project={tmp_path}", "name=run", "exist_ok=True"])
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(tmp_path / "run" / "weights" / "last.pt", weights_only=False)["model"]
    layers = [m for m in saved.modules() if isinstance(m, ODConv)]
    assert len(layers) == rows
    assert [(int(m.epoch), m.current_temperature()) for m in layers] == [(1, pytest.approx(27.1))] * rows
