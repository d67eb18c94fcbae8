"""svdtune inside PyTorch: dtypes, devices, autocast, attention modules, load_state_dict, compile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import svdtune
from tests.conftest import LAYERS, make_layer, randomize_deltas


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv2d", "convtranspose1d"])
def test_half_precision_weights(kind, dtype):
    layer, x = make_layer(kind, dtype=dtype)
    model = nn.Sequential(layer)
    with torch.no_grad():
        base = model(x)
    svdtune.apply(model, targets=["0"])
    assert layer.spectral_factors().sigma.dtype == torch.float32  # the SVD never runs in half
    assert layer.spectral_factors().U.dtype == dtype and layer.svd_delta.dtype == dtype
    with torch.no_grad():
        assert torch.equal(model(x), base)
    randomize_deltas(model, std=0.1)
    out = model(x)
    out.float().square().mean().backward()
    assert torch.isfinite(layer.svd_delta.grad).all()
    reference = copy.deepcopy(model)
    svdtune.merge(reference)
    assert reference[0].weight.dtype == dtype
    with torch.no_grad():
        torch.testing.assert_close(reference(x), model(x), rtol=2e-2, atol=2e-2)


def test_model_to_after_apply_moves_factors_with_the_model():
    layer, x = make_layer("linear")
    model = svdtune.apply(nn.Sequential(layer), targets=["0"])
    randomize_deltas(model)
    expected = model(x).detach().double()
    model.double()
    factors = layer.spectral_factors()
    assert factors.U.dtype == factors.Vh.dtype == layer.svd_delta.dtype == torch.float64
    torch.testing.assert_close(model(x.double()), expected, rtol=1e-5, atol=1e-6)
    model.to("meta")
    factors = layer._held_factors()  # the parameters registered now (a move to meta replaces them)
    assert factors.U.device.type == factors.sigma.device.type == "meta"


class NoHostSync(TorchFunctionMode):
    """Fails on any call that copies tensor data to the host."""

    BANNED = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "nonzero"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.BANNED:
            raise AssertionError(f"host copy inside forward: {name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("grad", [True, False])
def test_forward_makes_no_host_copy_and_runs_on_meta(kind, grad):
    layer, x = make_layer(kind)
    model = svdtune.apply(nn.Sequential(layer), targets=["0"], rank=2)
    with torch.set_grad_enabled(grad), NoHostSync():
        model(x)
    model.to("meta")  # no data at all: any data-dependent host step would fail
    with torch.set_grad_enabled(grad):
        out = model(x.to("meta"))
    assert out.device.type == "meta"


def test_autocast_bfloat16_on_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(28, 32), nn.ReLU(), nn.Linear(32, 1))
    x = torch.randn(4, 1, 16)
    svdtune.apply(model, targets=["*"])
    randomize_deltas(model, std=0.1)
    expected = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None for p in svdtune.trainable_parameters(model))
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)


def test_multihead_attention_out_proj_delta_is_not_ignored():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        base = attention(x, x, x)[0]
    svdtune.apply(attention, targets=["out_proj"])
    randomize_deltas(attention)
    out = attention(x, x, x)[0]
    assert not torch.allclose(out, base)
    out.sum().backward()
    assert attention.out_proj.svd_delta.grad.abs().sum() > 0
    merged = svdtune.merge(copy.deepcopy(attention))
    for train in (True, False):  # eval + no_grad takes the fused fast path
        attention.train(train), merged.train(train)
        with torch.no_grad():
            torch.testing.assert_close(attention(x, x, x)[0], merged(x, x, x)[0], rtol=1e-5, atol=1e-5)


def test_transformer_encoder_fast_path_sees_deltas():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True, dropout=0.0)
    x = torch.randn(2, 5, 16)
    layer.eval()
    with torch.no_grad():
        base = layer(x)
    svdtune.apply(layer, targets=["linear1", "linear2", "out_proj"])
    randomize_deltas(layer)
    merged = svdtune.merge(copy.deepcopy(layer)).eval()
    with torch.no_grad():
        out, expected = layer(x), merged(x)
    assert not torch.allclose(out, base, atol=1e-3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_loading_new_base_weights_recomputes_the_decomposition():
    torch.manual_seed(0)
    model = svdtune.apply(nn.Sequential(nn.Linear(6, 5)), targets=["0"])
    randomize_deltas(model)
    new_base = {"0.weight": torch.randn(5, 6), "0.bias": torch.randn(5)}
    model.load_state_dict(new_base, strict=False)
    fresh = nn.Sequential(nn.Linear(6, 5))
    fresh.load_state_dict(new_base)
    svdtune.apply(fresh, targets=["0"])
    with torch.no_grad():
        fresh[0].svd_delta.copy_(model[0].svd_delta)
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x), fresh(x))
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(x))


def test_reloading_the_same_weights_does_not_decompose_again(monkeypatch):
    model = svdtune.apply(nn.Sequential(nn.Linear(6, 5)), targets=["0"])
    calls = []
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1))
    model.load_state_dict(copy.deepcopy(model.state_dict()))
    model(torch.randn(2, 6))
    assert calls == []


def test_in_place_edit_of_base_weight_is_picked_up():
    torch.manual_seed(0)
    model = svdtune.apply(nn.Sequential(nn.Linear(6, 5)), targets=["0"])
    randomize_deltas(model)
    with torch.no_grad():
        model[0].base_weight.mul_(2.0)
    twin = nn.Sequential(nn.Linear(6, 5))
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if k != "0.svd_delta"})
    svdtune.apply(twin, targets=["0"])
    with torch.no_grad():
        twin[0].svd_delta.copy_(model[0].svd_delta)
        x = torch.randn(3, 6)
        torch.testing.assert_close(model(x), twin(x))


def test_eval_reuses_the_cached_weight_until_deltas_change():
    layer, x = make_layer("linear")
    model = svdtune.apply(nn.Sequential(layer), targets=["0"])
    with torch.no_grad():
        first = layer.weight
        assert layer.weight is first
        layer.svd_delta.add_(0.1)
        second = layer.weight
    assert second is not first and not torch.equal(second, first)
    svdtune.set_scale(model, 0.5)
    with torch.no_grad():
        assert layer.weight is not second


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 1))
    svdtune.apply(model, targets=["*"], rank=3)
    randomize_deltas(model, std=0.1)
    x = torch.randn(2, 3, 6, 6)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in svdtune.trainable_parameters(model))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 1))
    svdtune.apply(model, targets=["*"])
    randomize_deltas(model, std=0.1)
    x = torch.randn(2, 3, 6, 6)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in svdtune.trainable_parameters(model))


def test_edit_before_a_move_and_swapped_parameters_are_picked_up():
    torch.manual_seed(0)
    model = svdtune.apply(nn.Sequential(nn.Linear(6, 5)), targets=["0"], mode="scale")
    randomize_deltas(model)
    with torch.no_grad():
        model[0].base_weight.copy_(torch.randn(5, 6))
    model.float()  # a move after an in-place edit must not hide the edit
    x = torch.randn(3, 6)

    def fresh_twin():
        twin = nn.Sequential(nn.Linear(6, 5))
        twin.load_state_dict({k: v for k, v in model.state_dict().items() if k != "0.svd_delta"})
        svdtune.apply(twin, targets=["0"], mode="scale")
        with torch.no_grad():
            twin[0].svd_delta.copy_(model[0].svd_delta)
        return twin

    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh_twin()(x))
        model[0].weight = nn.Parameter(torch.randn(5, 6), requires_grad=False)  # same _version, new tensor
        torch.testing.assert_close(model(x), fresh_twin()(x))


def test_double_model_keeps_float64_spectrum():
    model = svdtune.apply(nn.Sequential(nn.Linear(6, 5)), targets=["0"]).double()
    assert model[0].spectral_factors().sigma.dtype == torch.float64
    assert model.float()[0].spectral_factors().sigma.dtype == torch.float32


def test_loading_a_non_finite_weight_is_refused_without_half_loading():
    model = svdtune.apply(nn.Sequential(nn.Linear(6, 5)), targets=["0"])
    before = model[0].base_weight.clone()
    bad = {k: v.clone() for k, v in model.state_dict().items()}
    bad["0.weight"][0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="'0'.*NaN"):
        model.load_state_dict(bad)
    assert torch.equal(model[0].base_weight, before)


def test_a_failed_load_leaves_no_stale_factors_behind():
    torch.manual_seed(0)
    model = svdtune.apply(nn.Sequential(nn.Linear(6, 5)), targets=["0"], mode="scale")
    randomize_deltas(model)
    new_weight = torch.randn(5, 6)
    bad = {"0.weight": new_weight, "0.bias": torch.zeros(5), "0.svd_delta": torch.zeros(3)}  # wrong delta shape
    with pytest.raises(RuntimeError, match="svd_delta"):
        model.load_state_dict(bad)
    assert torch.equal(model[0].base_weight, new_weight)  # PyTorch itself loaded the weight
    twin = nn.Sequential(nn.Linear(6, 5))
    twin.load_state_dict({"0.weight": new_weight, "0.bias": torch.zeros(5)})
    svdtune.apply(twin, targets=["0"], mode="scale")
    with torch.no_grad():
        twin[0].svd_delta.copy_(model[0].svd_delta)
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x), twin(x))  # the training path uses the new weight's factors


def test_writing_into_the_cached_weight_does_not_stick():
    layer, x = make_layer("linear")
    model = svdtune.apply(nn.Sequential(layer), targets=["0"])
    with torch.no_grad():
        expected = model(x)
        layer.weight.mul_(0)  # a write into the returned (cached) tensor
        assert torch.equal(model(x), expected)
