"""Hardening found by a fifth review (issue 10 follow-up): which factors go with which weights
(svdtune/tracking.py) and the no-grad W' cache. Each test failed on the code it was written against;
references are dense float64: W + U diag(sigma' - sigma) Vh from torch.linalg.svd."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import svdtune


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    model = svdtune.apply(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype), targets=["0", "2"])
    with torch.no_grad():
        for delta in svdtune.trainable_parameters(model):
            delta.normal_(0, 0.3)
    return model


def _dense(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W' in float64 (mode "shift", scale 1), differentiable in ``delta``."""
    W = weight.detach().double()
    U, sigma, Vh = torch.linalg.svd(W, full_matrices=False)
    return W + U @ torch.diag(torch.relu(sigma + delta.double()) - sigma) @ Vh


def _reference(model: nn.Module, x: torch.Tensor, delta0: torch.Tensor | None = None) -> torch.Tensor:
    first, second = model[0], model[2]
    d0 = first.svd_delta if delta0 is None else delta0
    h = torch.tanh(x.double() @ _dense(first.base_weight, d0).T + first.bias.double())
    return h @ _dense(second.base_weight, second.svd_delta.detach()).T + second.bias.double()


# 1. functional_call with a partial dict holding a new base weight ({"0.weight": W2}: a perturbed or averaged
# weight) decomposes W2 and writes its SVD into the *model's own* factor Parameters (_set_factors, `.data`),
# which functional_call does not put back: after the call the model holds W with the factors of W2. Eager
# forwards notice (the stamps point at the dead copy), but torch.func transforms trust factors they are
# given, so the usual idiom grad(f)({k: v.detach() for k, v in named_parameters()}) silently computes
# W + U2 diag(shift) Vh2: value and gradient both wrong, no error.
def test_a_partial_functional_call_with_a_new_weight_leaves_the_model_with_the_factors_of_its_own_weight():
    model, x = _model(), torch.randn(3, 6)
    torch.func.functional_call(model, {"0.weight": torch.randn(5, 6)}, (x,), strict=False)
    U, sigma, Vh = (model[0]._parameters[f"svd_{f}"].detach() for f in ("U", "sigma", "Vh"))
    torch.testing.assert_close(U @ torch.diag(sigma) @ Vh, model[0].base_weight.detach(), rtol=1e-4, atol=1e-5)


def test_a_torch_func_grad_after_a_partial_functional_call_with_a_new_weight_is_of_the_models_weight():
    model, x = _model(), torch.randn(3, 6)
    torch.func.functional_call(model, {"0.weight": torch.randn(5, 6)}, (x,), strict=False)

    def loss(params, batch):
        return torch.func.functional_call(model, params, (batch,)).sum()

    params = {name: p.detach() for name, p in model.named_parameters()}
    grads, value = torch.func.grad_and_value(loss)(params, x)
    delta = model[0].svd_delta.detach().double().requires_grad_()
    expected = _reference(model, x, delta).sum()
    torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads["0.svd_delta"].double(), torch.autograd.grad(expected, delta)[0],
                               rtol=1e-4, atol=1e-4)


# 2. The no-grad W' cache keys on the deltas' version, which inference tensors do not have (version_of gives
# 0). A trained model moved for serving under inference_mode (`.to(...)` there makes every parameter an
# inference tensor) then served a second adapter with svdtune.load_delta keeps serving the first adapter's
# cached W' (io.py: "the copy bumps the delta's version: a cached W' is rebuilt" does not hold there).
def test_load_delta_into_a_model_moved_under_inference_mode_is_not_served_a_stale_cached_weight(tmp_path):
    first, second, x = _model(), _model(), torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        for delta in svdtune.trainable_parameters(second):
            delta.normal_(0, 0.3)
    svdtune.save_delta(second, tmp_path / "second.safetensors")
    served = copy.deepcopy(first)
    with torch.inference_mode():
        served.to(torch.float64)
        served(x)  # builds the cache with the first adapter's deltas
        svdtune.load_delta(served, tmp_path / "second.safetensors")
        out = served(x)
    torch.testing.assert_close(out, _reference(second, x), rtol=1e-5, atol=1e-5)


# 3. torch.func.vmap or jvp over delta values (an ensemble of adapters, forward-mode sensitivities), with
# autograd on and a trainable model: the transform's delta does not require grad, so _needs_graph is False and
# _cached_weight calls data_ptr() on the wrapped tensor: RuntimeError "Cannot access data pointer of Tensor that
# doesn't have storage" (and the cache would keep a W' of wrapped tensors). vmap(grad(...)) works.
@pytest.mark.parametrize("transform", ["vmap", "vmap-no-grad", "jvp"])
def test_torch_func_vmap_and_jvp_over_delta_values_compute_the_adapted_output(transform):
    model, x = _model(), torch.randn(3, 6)
    deltas = torch.randn(4, 5) * 0.3

    def call(delta):
        return torch.func.functional_call(model, {"0.svd_delta": delta}, (x,), strict=False)

    if transform.startswith("vmap"):
        with torch.set_grad_enabled(transform == "vmap"):
            out = torch.func.vmap(call)(deltas)
        for row, delta in zip(out, deltas):
            torch.testing.assert_close(row.double(), _reference(model, x, delta), rtol=1e-4, atol=1e-5)
        return
    out, derivative = torch.func.jvp(call, (deltas[0],), (deltas[1],))
    _, expected = torch.func.jvp(lambda d: _reference(model, x, d), (deltas[0].double(),), (deltas[1].double(),))
    torch.testing.assert_close(out.double(), _reference(model, x, deltas[0]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(derivative.double(), expected, rtol=1e-4, atol=1e-5)


# 4. Needless SVDs. functional_call(model, model.state_dict(), x) (state_dict holds detached aliases of the
# weights and no factors) decomposes every layer on every call, though the weights are the model's own, and
# again on the next ordinary forward. And after a functional_call with copies of every parameter outside a
# transform, model.to(...) finds the stamps "stale" (they point at the dead copies) and decomposes every layer
# (`_apply` runs redecompose without the probe that a forward would run).
def test_functional_call_with_the_models_own_state_dict_runs_no_svd(svd_calls):
    model, x = _model(), torch.randn(3, 6)
    for _ in range(3):
        out = torch.func.functional_call(model, model.state_dict(), (x,))
    model(x)
    torch.testing.assert_close(out.double(), _reference(model, x), rtol=1e-4, atol=1e-5)
    assert len(svd_calls) == 0


def test_moving_the_model_after_a_functional_call_with_copies_runs_no_svd(svd_calls):
    model, x = _model(), torch.randn(3, 6)
    torch.func.functional_call(model, {name: p.detach().clone() for name, p in model.named_parameters()}, (x,))
    model.to(torch.float32)
    assert len(svd_calls) == 0


# 5. model.to(torch.float64) keeps float32-accurate factors (sigma is cast to float64, not recomputed): the
# output is off by ~1e-7 against the float64 reference (a model adapted in float64: ~1e-16), and svdtune's own
# probe rejects those factors, so every functional_call with copies of the parameters runs an SVD per layer.
def test_a_model_moved_to_float64_has_float64_factors_and_no_svd_per_functional_call(svd_calls):
    model, x = _model().to(torch.float64), torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference(model, x), rtol=1e-12, atol=1e-12)
    svd_calls.clear()
    for _ in range(3):
        torch.func.functional_call(model, {name: p.detach().clone() for name, p in model.named_parameters()}, (x,))
    assert len(svd_calls) <= 2  # at most once per layer
