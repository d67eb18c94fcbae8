"""The factors are frozen parameters hidden from checkpoints, and belong to the weight they came with."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import svdtune


def _model() -> nn.Module:
    torch.manual_seed(0)
    return svdtune.apply(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)), targets=["0", "2"])


def test_factors_are_frozen_parameters_outside_the_state_dict():
    model = _model()
    names = {name for name, _ in model.named_parameters()}
    assert {"0.svd_U", "0.svd_sigma", "0.svd_Vh", "2.svd_U"} <= names
    assert not any(p.requires_grad for name, p in model.named_parameters() if "svd_" in name and "delta" not in name)
    assert set(model.state_dict()) == {"0.weight", "0.bias", "0.svd_delta", "2.weight", "2.bias", "2.svd_delta"}
    assert svdtune.trainable_parameters(model) == [model[0].svd_delta, model[2].svd_delta]


def test_a_checkpoint_loads_strictly_and_never_writes_factors():
    model, other = _model(), _model()
    model.load_state_dict(other.state_dict())  # strict: no factor key is missing
    foreign = {**other.state_dict(), "0.svd_U": torch.zeros(5, 5)}
    U = model[0].svd_U.detach().clone()
    with pytest.raises(RuntimeError, match="Unexpected key.*0.svd_U"):
        model.load_state_dict(foreign)
    assert torch.equal(model[0].svd_U, U)


def test_a_weight_edited_alone_is_decomposed_again(svd_calls):
    model = _model()
    with torch.no_grad():
        model[0].base_weight.mul_(2)  # (model[0].weight is W')
    model(torch.randn(3, 6))
    assert len(svd_calls) == 1
    W = model[0].base_weight.detach()
    factors = model[0].spectral_factors()
    torch.testing.assert_close(factors.U @ torch.diag(factors.sigma) @ factors.Vh, W, rtol=1e-5, atol=1e-5)


def test_weight_and_factors_swapped_together_run_no_svd(svd_calls):
    model, x = _model(), torch.randn(3, 6)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    expected = model(x)
    out = torch.func.functional_call(model, params, (x,))
    assert svd_calls == []
    torch.testing.assert_close(out, expected)


def _dense(layer: nn.Module) -> torch.Tensor:
    """W + U diag(relu(sigma + delta) - sigma) Vh from a fresh float64 SVD of the layer's base weight."""
    W = layer.base_weight.detach().double()
    U, sigma, Vh = torch.linalg.svd(W, full_matrices=False)
    return W + U @ torch.diag(torch.relu(sigma + layer.svd_delta.detach().double()) - sigma) @ Vh


def test_load_state_dict_with_assign_takes_the_new_tensors_and_their_svd():
    model, other = _model(), _model()
    state = {name: tensor.clone() for name, tensor in other.state_dict().items()}
    torch.manual_seed(1)
    state["0.weight"] = torch.randn(5, 6)
    state["0.svd_delta"] = torch.randn(5) * 0.3
    assert not model.load_state_dict(state, assign=True).missing_keys
    layer = model[0]
    assert torch.equal(layer.base_weight, state["0.weight"])
    assert torch.equal(layer.svd_delta, state["0.svd_delta"]) and layer.svd_delta.requires_grad
    assert not layer.base_weight.requires_grad
    torch.testing.assert_close(layer.weight.double(), _dense(layer), rtol=1e-5, atol=1e-5)


def test_load_state_dict_with_assign_of_another_dtype_decomposes_the_weight_in_that_dtype():
    model = _model()
    state = {name: tensor.to(torch.bfloat16) for name, tensor in _model().state_dict().items()}  # same values
    model.load_state_dict(state, assign=True)
    layer, x = model[0], torch.randn(3, 6, dtype=torch.bfloat16)
    assert layer.base_weight.dtype == layer.svd_U.dtype == layer.svd_Vh.dtype == torch.bfloat16
    assert layer.svd_sigma.dtype == torch.float32
    expected = x.double() @ _dense(layer).T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=2e-2, atol=2e-2)


def test_factors_stay_frozen_when_the_whole_model_is_unfrozen():
    """model.requires_grad_(True) also sets the factors' flag: they still get no gradient, an optimizer
    over model.parameters() leaves them alone, and trainable_parameters neither returns nor names them."""
    model, x = _model(), torch.randn(4, 6)
    model.requires_grad_(True)  # full fine-tuning plus the deltas
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().sum().backward()
    assert all(getattr(model[i], f"svd_{f}").grad is None for i in (0, 2) for f in ("U", "sigma", "Vh"))
    optimizer.step()
    model(x)  # W was trained: decomposed again
    torch.testing.assert_close(model[0].weight.double(), _dense(model[0]), rtol=1e-5, atol=1e-5)
    with pytest.warns(RuntimeWarning) as caught:
        params = svdtune.trainable_parameters(model)
    assert not any(name.startswith("svd_") and "delta" not in name
                   for layer in (model[0], model[2]) for name, p in layer.named_parameters() if any(p is q for q in params))
    assert "svd_U" not in str(caught[0].message) and "0.weight" in str(caught[0].message)


def test_factors_unfrozen_by_name_are_not_trained_or_saved(tmp_path):
    """Unfreezing every parameter named svd_* (the deltas and, by mistake, the factors) trains only the deltas,
    and the delta file is the one of the deltas alone."""
    model, x = _model(), torch.randn(4, 6)
    for name, param in model.named_parameters():
        param.requires_grad_("svd_" in name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing was unfrozen that trains
        params = svdtune.trainable_parameters(model)
    assert params == [model[0].svd_delta, model[2].svd_delta]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()
    torch.testing.assert_close(model[0].weight.double(), _dense(model[0]), rtol=1e-5, atol=1e-5)
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    plain = _model()
    svdtune.restore(plain)
    svdtune.load_delta(plain, tmp_path / "d.safetensors")
    assert set(plain.state_dict()) == set(model.state_dict())
    torch.testing.assert_close(plain(x), model(x))


def test_a_model_moved_to_meta_comes_back_with_to_empty_and_load_state_dict():
    model, x = _model(), torch.randn(3, 6)
    with torch.no_grad():
        model[0].svd_delta.normal_(0, 0.3)
    state, expected = {k: v.clone() for k, v in model.state_dict().items()}, model(x)
    model.to("meta").to_empty(device="cpu")
    assert model[0].svd_sigma.dtype == torch.float32 and model[0].svd_sigma.device.type == "cpu"
    model.load_state_dict(state)
    torch.testing.assert_close(model(x), expected)


def test_functional_call_with_copies_of_every_parameter_and_a_new_weight(svd_calls):
    model, x = _model(), torch.randn(3, 6)
    expected = model(x)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}  # the torch.func idiom
    params["0.weight"] = params["0.weight"] + torch.randn(5, 6)
    params["0.svd_delta"] = torch.full_like(params["0.svd_delta"], 0.3)
    given, passed = dict(params), {name: t.clone() for name, t in params.items()}
    out = torch.func.functional_call(model, params, (x,))  # (it writes the new factors into the dict)
    W = params["0.weight"].double()  # dense reference: W + U diag(relu(sigma + 0.3) - sigma) Vh of the new W
    U, sigma, Vh = torch.linalg.svd(W, full_matrices=False)
    first = torch.tanh(x.double() @ (W + U @ torch.diag(torch.relu(sigma + 0.3) - sigma) @ Vh).T + params["0.bias"])
    torch.testing.assert_close(out, model[2](first.float()), rtol=1e-5, atol=1e-5)
    assert len(svd_calls) == 1  # the copied factors failed the probe: one SVD of the new weight
    assert all(torch.equal(given[name], passed[name]) for name in given)  # the caller's tensors untouched
    torch.testing.assert_close(model(x), expected)  # the model's own weight and factors are back


@pytest.mark.parametrize("make, inputs", [
    (lambda: nn.Linear(6, 5), (torch.randn(3, 6),)),
    (lambda: nn.Conv2d(3, 4, 3), (torch.randn(2, 3, 6, 6),)),
    (lambda: nn.Embedding(10, 4), (torch.tensor([1, 2, 7]),)),
    (lambda: nn.MultiheadAttention(8, 2), (torch.randn(4, 1, 8),) * 3),
], ids=["linear", "conv2d", "embedding", "attention"])
def test_a_pending_backward_uses_the_factors_of_its_forward_after_a_new_svd(make, inputs, svd_calls):
    torch.manual_seed(0)
    layer = svdtune.apply(nn.Sequential(make()), targets=["0"])[0]
    deltas = svdtune.trainable_parameters(layer)
    with torch.no_grad():
        for delta in deltas:
            delta.fill_(0.1)
    out = layer(*inputs)
    loss = (out[0] if isinstance(out, tuple) else out).square().sum()
    expected = torch.autograd.grad(loss, deltas, retain_graph=True)
    held = layer._parameters  # new base values, through .data (an in-place edit would break the graph itself)
    for name in [name for name, w in held.items() if w is not None and w.dim() >= 2 and not name.startswith("svd_")]:
        held[name].data.add_(torch.randn_like(held[name]))
    layer.redecompose()  # written into the layer's own factor parameters
    assert len(svd_calls) == len(layer.spectral_parts())
    for grad, ref in zip(torch.autograd.grad(loss, deltas), expected):
        torch.testing.assert_close(grad, ref)


def test_an_optimizer_over_all_parameters_still_holds_the_models_factors_after_a_new_svd():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    with torch.no_grad():
        model[0].base_weight.add_(1.0)
    model(torch.randn(3, 6))  # decomposed again
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters()}


def test_transient_copies_in_functional_call_never_pass_for_the_models_tensors():
    """A copy passed to functional_call dies after the call and can leave its id to the next call's copy:
    tensors are told apart by identity (a weak reference), not by id. Before, some of 200 torch.func
    calls took a reused id for "the factors did not change" and refused, or would decompose wrapped tensors."""
    model, x = _model(), torch.randn(4, 6)

    def loss(params, batch):
        return torch.func.functional_call(model, params, (batch,)).square().sum()

    expected = torch.autograd.grad(loss(dict(model.named_parameters()), x), svdtune.trainable_parameters(model))
    for _ in range(200):
        params = {name: p.detach() for name, p in model.named_parameters()}
        grads = torch.func.grad(loss)(params, x)
    for ref, name in zip(expected, ["0.svd_delta", "2.svd_delta"]):
        torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-5)


def test_each_new_weight_in_consecutive_functional_calls_gets_its_own_svd():
    model, x = _model(), torch.randn(3, 6)
    for seed in range(20):
        torch.manual_seed(seed)
        params = {name: p.detach().clone() for name, p in model.named_parameters()}  # copies of the old factors
        params["0.weight"] = torch.randn(5, 6)
        W = params["0.weight"].double()
        U, sigma, Vh = torch.linalg.svd(W, full_matrices=False)  # delta 0: W' = W, whatever the SVD
        first = torch.tanh(x.double() @ (U @ torch.diag(sigma) @ Vh).T + params["0.bias"])
        out = torch.func.functional_call(model, params, (x,))
        torch.testing.assert_close(out, model[2](first.float()), rtol=1e-5, atol=1e-5)


def test_the_eval_cache_is_not_fooled_by_a_new_delta_at_a_freed_deltas_address():
    """GPU caching allocators hand a freed block to the next tensor of its size: a new delta (a copy in
    functional_call, a new Parameter) can have the old one's address and version. The no-grad W' cache
    then served the old deltas' W'. Emulated here: a new tensor on the same memory, holding new values."""
    model, x = _model().eval(), torch.randn(3, 6)
    layer = model[0]
    W = layer.base_weight.detach().double()
    U, sigma, Vh = torch.linalg.svd(W, full_matrices=False)

    def expected(value: float) -> torch.Tensor:
        first = torch.tanh(x.double() @ (W + U @ torch.diag(torch.relu(sigma + value) - sigma) @ Vh).T + layer.bias)
        return model[2](first.float())

    def run(delta: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.func.functional_call(model, {"0.svd_delta": delta}, (x,), strict=False)

    old = torch.full((5,), 0.1).add_(0.0)  # version 1, as the tensor set_ makes below
    torch.testing.assert_close(run(old), expected(0.1), rtol=1e-5, atol=1e-5)
    memory = old.untyped_storage()
    torch.empty(0).set_(memory, 0, (5,)).fill_(0.5)  # new values, written through another tensor object
    del old  # freed: the next tensor takes its memory
    new = torch.empty(0).set_(memory, 0, (5,))  # a new tensor, version 1, at the old address
    assert new.data_ptr() == memory.data_ptr() and new._version == 1
    torch.testing.assert_close(run(new), expected(0.5), rtol=1e-5, atol=1e-5)
