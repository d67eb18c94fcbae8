"""Hardening found by a sixth review (issue 10 follow-up) of svdtune/tracking.py, which factors go with the
base weights held now, and of the no-grad W' cache. Each test failed on the code it was written against
(main at bd13bc8). References are dense float64: W + U diag(relu(sigma + delta) - sigma) Vh from
torch.linalg.svd of the weight the layer holds."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.func import functional_call

import svdtune
from tests.test_hardening_identity import _model, _reference  # the same model and dense reference

FACTORS = ("svd_U", "svd_sigma", "svd_Vh")


def _assert_matches_reference(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), _reference(model, x), rtol=1e-4, atol=1e-5)


# 1. _load_from_state_dict skips a layer whose incoming weight equals the weight it holds now (or that the
# dict lacks), then stamps whatever the layer holds as its own (`state.stamps = self._stamps()`). A weight
# edited in place, or a base Parameter replaced, since the last SVD is thereby declared to go with the old
# factors: every later forward silently uses the SVD of the previous weight.
def _edit_in_place(model: nn.Module) -> None:
    with torch.no_grad():
        model[0].base_weight.add_(torch.randn(5, 6))


def _replace_parameter(model: nn.Module) -> None:
    model[0]._parameters["weight"] = nn.Parameter(torch.randn(5, 6), requires_grad=False)


@pytest.mark.parametrize("change", [_edit_in_place, _replace_parameter], ids=["edited", "replaced"])
@pytest.mark.parametrize("which", ["own-state-dict", "deltas-only"])
def test_load_state_dict_after_a_new_base_weight_keeps_the_factors_of_that_weight(change, which):
    model, x = _model(), torch.randn(3, 6)
    change(model)
    state = model.state_dict()
    if which == "deltas-only":  # e.g. resuming an adapter checkpoint with strict=False
        state = {k: v.clone() for k, v in state.items() if "svd_delta" in k}
    model.load_state_dict(state, strict=which != "deltas-only")
    _assert_matches_reference(model, x)


# 2. Factors written in place while the weight is untouched (own weights, not edited) are stamped as the
# layer's own without the probe (tracking._check_current: `own_factors` -> _stamp_as): a sigma clamp, an
# init loop over 1-D parameters, a broadcast of frozen parameters from another model. (With the deltas
# clipped by relu, the shift relu(sigma + delta) - sigma depends on sigma.)
@pytest.mark.parametrize("written", [FACTORS, ("svd_sigma",)], ids=["all-factors", "sigma"])
def test_factors_written_in_place_without_the_weight_are_probed(written):
    model, other, x = _model(0), _model(1), torch.randn(3, 6)
    with torch.no_grad():
        for name in written:
            model[0]._parameters[name].copy_(other[0]._parameters[name])
        model[0].svd_delta.fill_(-100.0)  # relu clips every value: W' = W - U diag(sigma) Vh, which sigma decides
    _assert_matches_reference(model, x)


# 3. Inference tensors have no version counter (tracking.version_of gives 0), yet they can be edited in
# place inside inference_mode. A model moved for serving under inference_mode then edited there keeps
# serving the cached W' of the old deltas, or the factors of the old base weight.
@pytest.mark.parametrize("edited", ["svd_delta", pytest.param("weight", marks=pytest.mark.xfail(
    strict=True, reason="documented (guide, inference_mode): an inference-tensor weight has no version counter, "
    "and comparing it whole each forward would cost as much as the forward; call layer.redecompose()"))])
def test_edits_inside_inference_mode_reach_the_output(edited):
    model, x = _model(), torch.randn(3, 6, dtype=torch.float64)
    with torch.inference_mode():
        model.to(torch.float64)
        model(x)  # builds the no-grad W' cache
        param = model[0]._parameters[edited]
        param.add_(torch.randn(param.shape, dtype=torch.float64))
        out = model(x)
    torch.testing.assert_close(out, _reference(model, x), rtol=1e-4, atol=1e-5)


# 4. state.foreign is documented as kept "for as long as that weight is held"; it outlives the call that
# held it: after functional_call with a new weight returns and the weight is freed, the layer still holds
# its SVD (U (m, k), Vh (k, n): about one weight's worth per layer) until the next forward on its own weights.
def test_the_svd_of_a_swapped_in_weight_is_released_with_that_weight():
    model, x = _model(), torch.randn(3, 6)
    weight = torch.randn(5, 6)
    with torch.no_grad():
        functional_call(model, {"0.weight": weight}, (x,), strict=False)
    held = model[0]._spectral.foreign
    assert held  # (what is checked: it goes when the weight goes)
    alive = weakref.ref(held[0].factors[""].U)
    del weight, held
    gc.collect()
    assert alive() is None


# 5. Needless SVDs. (a) An nn.MultiheadAttention with separate q/k/v weights, given a new k_proj_weight
# alone: the probe fails on k and _decompose_swapped_in decomposes all three parts, though q and v are the
# layer's own, unchanged tensors (3 SVDs per call where 1 is needed).
class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True, kdim=12, vdim=12)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.attn(q, kv, kv, need_weights=False)[0]


def test_a_new_k_proj_weight_alone_runs_one_svd(svd_calls):
    torch.manual_seed(0)
    model = svdtune.apply(_Attention(), targets=["attn"])
    q, kv = torch.randn(2, 3, 16), torch.randn(2, 5, 12)
    with torch.no_grad():
        functional_call(model, {"attn.k_proj_weight": torch.randn(16, 12)}, (q, kv), strict=False)
    assert len(svd_calls) == 1


# (b) A loop alternating the model's own weights with one persistent swapped-in weight (a reference or
# teacher weight dict kept by the caller): every own forward drops that weight's SVD, so every swapped call
# decomposes it again although the same tensor, at the same version, is passed.
def test_alternating_with_the_same_swapped_in_weight_decomposes_it_once(svd_calls):
    model, x, other = _model(), torch.randn(3, 6), torch.randn(5, 6)
    with torch.no_grad():
        for _ in range(4):
            model(x)
            functional_call(model, {"0.weight": other}, (x,), strict=False)
    assert len(svd_calls) == 1


# (c) A DDP-like broadcast writes weights and factors together (copy_ under no_grad); the forward would keep
# them after the probe, but a `.to()` before that forward counts the layer stale and decomposes it again.
def test_a_move_after_weights_and_factors_were_written_together_runs_no_svd(svd_calls):
    model, source, x = _model(0), _model(1), torch.randn(3, 6)
    with torch.no_grad():
        for name in ("weight", *FACTORS):
            model[0]._parameters[name].copy_(source[0]._parameters[name])
    model.to("cpu")
    _assert_matches_reference(model, x)
    assert len(svd_calls) == 0
