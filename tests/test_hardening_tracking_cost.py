"""Hardening found by a seventh review (issue 10 follow-up) of svdtune/tracking.py after its per-part
rework: the SVDs of swapped-in weights (kept, bounded, freed with their weight), `_adopt`, and per-part
decisions. Each test failed on the code it was written against (main at dafc594). References are dense
float64 (torch.linalg.svd of the weight the layer holds); SVDs are counted with ``svd_calls`` (conftest)."""

from __future__ import annotations

import copy
import gc
import pickle
import weakref

import torch
from torch import nn
from torch.func import functional_call, grad

import svdtune
from tests.test_hardening_identity import _dense, _model, _reference


def _reference_with(model: nn.Module, x: torch.Tensor, weight0: torch.Tensor, delta0: torch.Tensor) -> torch.Tensor:
    """The dense float64 output with ``weight0`` as the first layer's base weight."""
    first, second = model[0], model[2]
    h = torch.tanh(x.double() @ _dense(weight0, delta0).T + first.bias.double())
    return h @ _dense(second.base_weight, second.svd_delta.detach()).T + second.bias.double()


# 1. Each swap registers a weakref.finalize on the swapped-in tensors that holds the entry (stamps and SVD).
# When another swapped-in weight supersedes the entry, the finalizer still holds it: the superseded SVD
# stays in memory as long as its weight lives. Two held weight sets used in turn (an ensemble or EMA
# evaluated with functional_call) leak one SVD per call (100 calls: 100 finalizers, 100 SVDs alive).
def test_the_svds_kept_for_held_swapped_in_weights_are_bounded():
    """(The fix keeps the SVDs of the FOREIGN_KEPT most recent swapped-in weights, so that weights used in
    turn are decomposed once each; an older one is freed even while its weight lives.)"""
    model, x = _model(), torch.randn(3, 6)
    weights = [torch.randn(5, 6) for _ in range(10)]
    kept = []
    for weight in weights:
        functional_call(model, {"0.weight": weight}, (x,), strict=False)
        kept.append(weakref.ref(model[0]._spectral.foreign[0].factors[""].U))
    gc.collect()
    alive = sum(ref() is not None for ref in kept)
    assert alive == svdtune.tracking.FOREIGN_KEPT, f"{alive} SVDs of swapped-in weights are held"


# 2. A copy or pickle taken while a swapped-in weight is alive carries its SVD in `state.foreign`, with
# dead stamps (Stamp.__reduce__) and no finalizer: it never serves and is never freed. torch.save(model)
# after one functional_call with a new 300x300 weight: 1.09 MB -> 1.81 MB.
def test_a_copy_or_pickle_does_not_carry_the_svd_of_a_swapped_in_weight():
    torch.manual_seed(0)
    model = svdtune.apply(nn.Sequential(nn.Linear(64, 64)), targets=["0"], progress=False)
    x, other = torch.randn(2, 64), torch.randn(64, 64)
    size = len(pickle.dumps(model))
    functional_call(model, {"0.weight": other}, (x,), strict=False)
    assert len(pickle.dumps(model)) == size
    assert copy.deepcopy(model)[0]._spectral.foreign == []


# 3. Factors swapped in alone (the layer's own weight, unedited) that fail the probe get an SVD of the
# layer's own weight on every call, and that SVD is pinned in `state.foreign` for as long as the layer
# lives, though the layer's own factors are of exactly that weight (0 SVDs would do).
def test_swapped_in_factors_that_fail_with_the_own_weight_use_the_own_factors(svd_calls):
    model, x = _model(), torch.randn(3, 6)
    wrong = model[0].svd_sigma.detach() * 2
    for _ in range(3):
        out = functional_call(model, {"0.svd_sigma": wrong}, (x,), strict=False)
        with torch.no_grad():
            torch.testing.assert_close(out.double(), _reference(model, x), rtol=1e-4, atol=1e-5)
    assert len(svd_calls) == 0


# 4. The guide: an SVD of a swapped-in weight "serves the call (and later calls, while that same tensor is
# held)". Only the last one is kept: two held weights used in turn get an SVD on every call.
def test_two_held_swapped_in_weights_used_in_turn_are_decomposed_once_each(svd_calls):
    model, x = _model(), torch.randn(3, 6)
    weights = (torch.randn(5, 6), torch.randn(5, 6))
    for _ in range(3):
        for weight in weights:
            out = functional_call(model, {"0.weight": weight}, (x,), strict=False)
            expected = _reference_with(model, x, weight, model[0].svd_delta.detach())
            torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    assert len(svd_calls) <= 2


# 5. Inside torch.func.grad, a new weight passed with detached aliases of the model's own factors (the
# usual {k: v.detach() for k, v in named_parameters()} with one weight replaced) is trusted: value and
# gradient are of W2 + U diag(shift) Vh of the *old* weight's factors (gradient error 0.41), not refused
# as the guide says ("a new base weight passed without new factors is refused"). (Also on bd13bc8.)
def test_grad_with_a_new_weight_and_the_models_own_factors_is_right_or_refused():
    model, x = _model(), torch.randn(3, 6)
    new, delta = torch.randn(5, 6), model[0].svd_delta.detach().clone()

    def loss(d):
        params = {k: v.detach() for k, v in model.named_parameters()} | {"0.weight": new, "0.svd_delta": d}
        return functional_call(model, params, (x,)).sum()

    try:
        got = grad(loss)(delta)
    except svdtune.SvdtuneError:
        return  # refused: as documented
    d = delta.double().requires_grad_()
    _reference_with(model, x, new, d).sum().backward()
    torch.testing.assert_close(got.double(), d.grad, rtol=1e-4, atol=1e-5)


# 6. Per-part decisions: an in-place edit of the k rows of a packed in_proj_weight decomposes q, k and v
# (3 SVDs; the separate layout, and a swapped-in packed weight, take 1): q and v are not probed.
def test_an_in_place_edit_of_the_k_rows_of_a_packed_attention_weight_is_one_svd(svd_calls):
    torch.manual_seed(0)
    model = svdtune.apply(nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True)), targets=["0"], progress=False)
    layer, q = model[0], torch.randn(2, 3, 8)
    with torch.no_grad():
        layer._parameters["in_proj_weight"][8:16].add_(torch.randn(8, 8))
        layer(q, q, q, need_weights=False)
    assert len(svd_calls) == 1
    W = layer._parameters["in_proj_weight"].detach()[8:16]
    torch.testing.assert_close((lambda f: f.U @ torch.diag(f.sigma) @ f.Vh)(layer.spectral_factors("k_proj")), W,
                               rtol=1e-4, atol=1e-5)
