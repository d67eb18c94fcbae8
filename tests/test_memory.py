"""`svdtune.set_memory`: an offloaded base weight stays in CPU memory and is never read by the training
forward; the W' cache can be switched off. Each test compares against the same model without the option,
or a dense float64 reference W + U diag(shift) Vh computed by hand.

Without a GPU, "the device" is the CPU (or the meta device, where only placement can be checked):
what these tests show is semantics, not device memory (benchmarks/memory_options.py measures that)."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import safetensors.torch
import torch
from torch import nn

import svdtune
from svdtune.errors import SvdtuneError
from svdtune.layers import SpectralLayer
from tests.conftest import LAYERS, make_layer, randomize_deltas

# name -> (factory, inputs for a batch): every kind, so that every training forward is covered
CASES = {
    **{name: (lambda n=name: make_layer(n)[0], lambda n=name: (make_layer(n)[1],)) for name in LAYERS},
    "linear-many-rows": (lambda: nn.Linear(12, 9), lambda: (torch.randn(200, 12),)),  # resident: "rebuild" path
    "embedding": (lambda: nn.Embedding(12, 5), lambda: (torch.randint(0, 12, (3, 4)),)),
    "embedding-grad-by-freq": (lambda: nn.Embedding(12, 5, scale_grad_by_freq=True), lambda: (torch.randint(0, 12, (7,)),)),
    "embedding-bag-max": (lambda: nn.EmbeddingBag(12, 5, mode="max"), lambda: (torch.randint(0, 12, (3, 4)),)),
    "attention-packed": (lambda: nn.MultiheadAttention(8, 2), lambda: (torch.randn(5, 2, 8),) * 3),
    "attention-separate": (lambda: nn.MultiheadAttention(8, 2, kdim=6, vdim=5),
                           lambda: (torch.randn(5, 2, 8), torch.randn(4, 2, 6), torch.randn(4, 2, 5))),
}


def build(name: str, offload: bool = False, deltas: bool = True, **memory) -> tuple[nn.Sequential, tuple]:
    """nn.Sequential(layer) adapted at full rank, seeded, with random deltas; and its inputs."""
    factory, inputs = CASES[name]
    torch.manual_seed(0)
    model = nn.Sequential(factory())
    svdtune.apply(model, ["0"], progress=False)
    if deltas:
        randomize_deltas(model, seed=3)
    if offload or memory:
        svdtune.set_memory(model, offload_base=offload or None, **memory)
    torch.manual_seed(1)
    return model, inputs()


def run(model: nn.Module, inputs: tuple) -> torch.Tensor:
    out = model[0](*inputs)
    return out[0] if isinstance(out, tuple) else out  # nn.MultiheadAttention: (output, weights)


def dense_reference(layer: SpectralLayer, param: str = "weight") -> torch.Tensor:
    """W + U diag(shift) Vh in float64 from the layer's own factors and deltas, by hand, in the parameter's layout."""
    base = layer._parameters[param].detach().double()
    if param == "in_proj_weight":
        rows = base.shape[0] // 3
        blocks = [base[i * rows:(i + 1) * rows] + _change(layer, part) for i, part in enumerate(layer.spectral_parts())]
        return torch.cat(blocks)
    part = param.removesuffix("_weight") if param != "weight" else ""
    if getattr(layer, "_spectral").kind.transposed:
        return (base.t() + _change(layer, part)).t()
    return (base.reshape(base.shape[0], -1) + _change(layer, part)).reshape(base.shape)


def _change(layer: SpectralLayer, part: str) -> torch.Tensor:
    factors = layer.spectral_factors(part)
    delta = layer.spectral_delta(part).detach().double()
    sigma = factors.sigma.double()
    shift = torch.clamp(sigma + delta, min=0) - sigma  # mode "shift", scale 1
    return factors.U.double() @ torch.diag(shift) @ factors.Vh.double()


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("cache", [True, False])
def test_zero_deltas_give_the_base_model_bit_for_bit(name, cache):
    model, inputs = build(name, offload=True, deltas=False, cache_weights=cache)
    torch.manual_seed(0)
    base = nn.Sequential(CASES[name][0]())
    with torch.no_grad():
        assert torch.equal(run(model, inputs), run(base, inputs))


@pytest.mark.parametrize("name", sorted(CASES))
def test_eval_and_merge_equal_the_resident_model_and_the_dense_reference(name):
    resident, inputs = build(name)
    for memory in (dict(offload=True), dict(offload=True, cache_weights=False), dict(cache_weights=False)):
        model, _ = build(name, **memory)
        with torch.no_grad():
            assert torch.equal(run(model, inputs), run(resident, inputs)), memory
            for param in model[0]._params():
                reference = dense_reference(model[0], param)
                assert torch.allclose(getattr(model[0], param).double(), reference, atol=1e-5), param
    merged, kept = svdtune.merge(model), svdtune.merge(copy.deepcopy(resident))
    for key, value in kept.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key


class Unreadable(torch.Tensor):
    """A base weight whose values no torch function may read once armed (shape and views are allowed)."""

    armed = False
    METADATA = {"__get__", "size", "dim", "reshape", "t", "view", "is_inference", "__len__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if cls.armed and getattr(func, "__name__", "") not in cls.METADATA:
            raise AssertionError(f"the training forward read the offloaded base weight ({func.__name__})")
        return super().__torch_function__(func, types, args, kwargs or {})


def poison_base_weights(layer: SpectralLayer) -> None:
    for param in layer._params():
        weight = layer._parameters[param]
        layer._parameters[param] = nn.Parameter(weight.detach().clone().as_subclass(Unreadable), requires_grad=False)
    layer._spectral.stamps = layer._stamps()  # the same values: no new decomposition


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_training_forward_never_reads_an_offloaded_weight_and_gives_the_same_gradients(name, monkeypatch):
    resident, inputs = build(name)
    model, _ = build(name, offload=True)
    poison_base_weights(model[0])
    monkeypatch.setattr(Unreadable, "armed", True)
    run(model, inputs).square().sum().backward()
    monkeypatch.setattr(Unreadable, "armed", False)
    run(resident, inputs).square().sum().backward()
    for part in model[0].spectral_parts():
        grad, expected = model[0].spectral_delta(part).grad, resident[0].spectral_delta(part).grad
        assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-5), (part, grad, expected)


def test_a_linear_forced_onto_the_factorized_path_has_the_resident_gradients():
    """Few rows: the resident layer takes the factorized path too, so the gradients are equal bit for bit;
    many rows: it rebuilds W', while the offloaded one stays factorized (equal to rounding)."""
    for rows, exact in ((4, True), (200, False)):
        grads = []
        for offload in (False, True):
            torch.manual_seed(0)
            model = svdtune.apply(nn.Sequential(nn.Linear(16, 16)), ["0"], progress=False)
            randomize_deltas(model, seed=2)
            if offload:
                svdtune.set_memory(model, offload_base=True)
            torch.manual_seed(1)
            model(torch.randn(rows, 16)).square().sum().backward()
            grads.append(model[0].svd_delta.grad)
        assert torch.equal(*grads) if exact else torch.allclose(*grads, rtol=1e-4), rows


def test_dtype_changes_keep_an_offloaded_weight_in_cpu_memory_and_cast_it():
    model, (x,) = build("linear", offload=True, deltas=False)
    weight, original = model[0].base_weight, model[0].base_weight.detach().clone()
    model.to(torch.float64)
    assert model[0].base_weight is weight and weight.device.type == "cpu" and weight.dtype == torch.float64
    assert torch.equal(weight, original.double())
    factors = model[0].spectral_factors()
    assert factors.U.dtype == factors.Vh.dtype == model[0].svd_delta.dtype == torch.float64
    base = copy.deepcopy(model)
    svdtune.restore(base)
    with torch.no_grad():
        assert torch.equal(model(x.double()), base(x.double()))
    model.to(torch.bfloat16)
    assert weight.dtype == torch.bfloat16 and torch.equal(weight, original.bfloat16())


def test_a_move_to_another_device_never_hands_the_offloaded_weight_to_the_conversion():
    """nn.Module.to(device, dtype) as a spy: W is cast on the CPU, never given to the conversion."""
    model, _ = build("conv2d", offload=True)
    layer, weight = model[0], model[0].base_weight
    original, seen = weight.detach().clone(), []

    def to_meta(tensor):
        seen.append(tensor)
        return tensor.to("meta", torch.float64 if tensor.is_floating_point() else None)

    model._apply(to_meta)
    assert not any(t is weight for t in seen) and weight.device.type == "cpu" and weight.dtype == torch.float64
    assert torch.equal(weight, original.double())
    factors = layer.spectral_factors()
    assert {t.device.type for t in (factors.U, factors.sigma, factors.Vh, layer.svd_delta, layer.bias)} == {"meta"}
    svdtune.restore(model)  # restore copies W back to the deltas' device (a new Parameter for meta, as .to does)
    assert type(layer) is nn.Conv2d and layer.weight.device.type == "meta" and layer.weight.dtype == torch.float64


def test_factors_decomposed_again_follow_the_deltas_not_the_offloaded_weight():
    model, _ = build("linear", offload=True)
    layer = model[0]
    model._apply(lambda t: t.to("meta"))
    with torch.no_grad():
        layer.base_weight.mul_(2)  # an in-place edit: the next use decomposes the CPU weight again
    assert layer.spectral_factors().U.device.type == "meta"
    torch.manual_seed(5)
    layer.load_state_dict({**layer.state_dict(), "weight": torch.randn(9, 12)})
    assert layer.spectral_factors().U.device.type == "meta" and layer.base_weight.device.type == "cpu"


def test_pinned_memory_is_asked_for_when_cuda_is_available(monkeypatch):
    pinned = []

    def pin_memory(tensor):
        pinned.append(tuple(tensor.shape))
        return tensor.clone()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    model, _ = build("linear", offload=True)
    assert pinned == [(9, 12)]
    model.to(torch.float64)  # a new CPU tensor: pinned again
    assert pinned == [(9, 12)] * 2 and model[0].base_weight.dtype == torch.float64


def test_restore_and_offload_false_give_the_same_weight_back():
    model, (x,) = build("conv1d", offload=True)
    layer, weight, original = model[0], model[0].base_weight, model[0].base_weight.detach().clone()
    with torch.no_grad():
        expected = model(x)
    svdtune.set_memory(model, offload_base=False)
    assert not svdtune.memory.offloaded(layer) and layer.base_weight is weight and torch.equal(weight, original)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    svdtune.set_memory(model, offload_base=True)
    svdtune.restore(model)
    assert type(layer) is nn.Conv1d and layer.weight is weight and torch.equal(weight, original)
    assert weight.requires_grad  # as before apply


def test_the_state_dict_and_delta_files_are_those_of_the_resident_model(tmp_path):
    resident, (x,) = build("linear-3d-input")
    model, _ = build("linear-3d-input", offload=True, cache_weights=False)
    state, expected = model.state_dict(), resident.state_dict()
    assert list(state) == list(expected) and all(torch.equal(state[k], v) for k, v in expected.items())
    svdtune.save_delta(model, tmp_path / "offloaded.safetensors")
    svdtune.save_delta(resident, tmp_path / "resident.safetensors")
    saved = [safetensors.torch.load_file(tmp_path / f"{n}.safetensors") for n in ("offloaded", "resident")]
    assert saved[0].keys() == saved[1].keys() and all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
    torch.manual_seed(0)
    fresh = svdtune.load_delta(nn.Sequential(CASES["linear-3d-input"][0]()), tmp_path / "offloaded.safetensors")
    svdtune.load_delta(model, tmp_path / "resident.safetensors")  # into the offloaded model itself
    with torch.no_grad():
        assert torch.equal(fresh(x), resident(x)) and torch.equal(model(x), resident(x))


def test_export_lora_of_an_offloaded_model_is_the_resident_models(tmp_path):
    pytest.importorskip("peft")
    resident, _ = build("linear")
    model, _ = build("linear", offload=True)
    files = []
    for name, source in (("resident", resident), ("offloaded", model)):
        svdtune.export_lora(source, tmp_path / name)
        files.append(safetensors.torch.load_file(tmp_path / name / "adapter_model.safetensors"))
    assert files[0].keys() == files[1].keys() and all(torch.equal(files[0][k], files[1][k]) for k in files[0])


def test_with_the_cache_off_each_read_rebuilds_w_prime_and_keeps_nothing():
    model, (x,) = build("linear")
    with torch.no_grad():
        cached = model(x)
    assert dict(svdtune.report(model).memory.rows)["0"].cached > 0
    svdtune.set_memory(model, cache_weights=False)  # drops the cache held now
    layer = model[0]
    with torch.no_grad():
        assert torch.equal(model(x), cached)
        first, second = layer.weight, layer.weight
    assert first is not second and torch.equal(first, second) and torch.allclose(first.double(), dense_reference(layer))
    row = dict(svdtune.report(model).memory.rows)["0"]
    assert row.cached == 0 and not row.cache and "off" in str(svdtune.report(model).memory)
    svdtune.set_memory(model, cache_weights=True)
    with torch.no_grad():
        assert layer.weight is layer.weight


def test_the_report_shows_where_w_is_and_what_is_on_the_device():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6))
    svdtune.apply(model, ["0"], progress=False)
    svdtune.apply(model, ["2"], rank=2, progress=False)
    with pytest.warns(UserWarning, match=r"leaves 1 of 2 adapted layers .*below full rank.*\['2'\]"):
        svdtune.set_memory(model, offload_base=True)
    assert svdtune.memory.offloaded(model[0]) and not svdtune.memory.offloaded(model[2])
    with torch.no_grad():
        model(torch.randn(2, 8))
    rows = dict(svdtune.report(model).memory.rows)
    full, low = rows["0"], rows["2"]
    assert full.device == "cpu (W offloaded)" and full.on_device == full.factors + full.cached == full.total - 8 * 8 * 4
    assert low.device == "cpu" and low.on_device == low.total == low.weight + low.factors + low.cached
    total = svdtune.report(model).memory.total()
    assert total.on_device == full.on_device + low.on_device
    text = str(svdtune.report(model))
    assert "on device" in str(svdtune.report(model).memory) and "; on the device " in text


def test_bad_arguments_and_models_that_cannot_offload_are_refused_unchanged():
    model, _ = build("linear")
    for bad in (dict(offload_base=1), dict(cache_weights="no"), dict(offload_base=torch.tensor(True))):
        with pytest.raises(SvdtuneError, match="must be True, False or None"):
            svdtune.set_memory(model, **bad)
    with pytest.raises(SvdtuneError, match="no svdtune layers"):
        svdtune.set_memory(nn.Linear(2, 2), offload_base=True)
    torch.manual_seed(0)
    low = svdtune.apply(nn.Sequential(nn.Linear(8, 8)), ["0"], rank=3, progress=False)
    with pytest.raises(SvdtuneError, match="no full-rank layer"):
        svdtune.set_memory(low, offload_base=True, cache_weights=False)
    assert svdtune.memory.options(low[0]) == svdtune.memory.MemoryOptions()
    model[0].base_weight.requires_grad_(True)
    with pytest.raises(SvdtuneError, match="trains its base weight"):
        svdtune.set_memory(model, offload_base=True)
    assert not svdtune.memory.offloaded(model[0])


def test_copies_and_pickles_keep_the_options():
    model, (x,) = build("linear", offload=True, cache_weights=False)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert svdtune.memory.options(other[0]) == svdtune.memory.MemoryOptions(offload=True, cache=False)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(other(x), model(x))


def test_layers_adapted_after_set_memory_get_the_defaults_and_load_delta_models_take_the_options(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6))
    svdtune.apply(model, ["0"], progress=False)
    svdtune.set_memory(model, offload_base=True, cache_weights=False)
    svdtune.apply(model, ["2"], progress=False)
    assert svdtune.memory.options(model[2]) == svdtune.memory.MemoryOptions()
    randomize_deltas(model, seed=4)
    svdtune.save_delta(model, tmp_path / "task.safetensors")
    torch.manual_seed(0)
    loaded = svdtune.load_delta(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6)), tmp_path / "task.safetensors")
    svdtune.set_memory(loaded, offload_base=True)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert all(svdtune.memory.offloaded(layer) for layer in (loaded[0], loaded[2]))
