"""Hardening found by an eighth review (issue 10 follow-up) of svdtune/tracking.py: torch.func transforms right
after an in-place weight edit, and a rank-k layer whose tail singular value grows past the kept ones. Each
test failed on main at a14e34e. References are dense float64: torch.linalg.svd of the weight the layer holds."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import svdtune
from svdtune import SvdtuneError


def _dense(weight: torch.Tensor, delta: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """W' = W + U_k diag(relu(sigma + delta) - sigma) Vh_k in float64, from a fresh SVD of ``weight``."""
    W = weight.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    k = rank or S.numel()
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    return W + U @ torch.diag(torch.relu(S + delta.double()) - S) @ Vh


def _edited_model():
    """A one-Linear model whose base weight was edited in place (documented as noticed) after apply."""
    torch.manual_seed(0)
    model = svdtune.apply(nn.Sequential(nn.Linear(6, 5)), targets=["0"], progress=False)
    layer = model[0]
    with torch.no_grad():
        layer.svd_delta.copy_(torch.randn(5) * 0.3)
        layer(torch.randn(2, 6))  # factors agree with the weight here
        layer.base_weight.add_(torch.randn(5, 6))  # an in-place edit; no forward until the transform
    return model, torch.randn(7, 6), torch.randn(7, 5)


# 1. Inside torch.func transforms nothing is probed or decomposed, and the layer's own weight edited in
# place goes through `_check_own_weights`, whose `_parts_not_fitting` answers "all fit" in a transform:
# the stale factors (of the weight before the edit) serve, silently. Outside a transform the same call is
# exact. Expected: the output/gradient of the edited weight, or an SvdtuneError; got the old weight's.
def test_grad_over_deltas_right_after_an_in_place_weight_edit():
    model, x, y = _edited_model()
    layer = model[0]

    def loss(delta):
        return ((functional_call(model, {"0.svd_delta": delta}, (x,)) - y) ** 2).sum()

    delta = layer.svd_delta.detach().double().clone().requires_grad_(True)
    reference = ((x.double() @ _dense(layer.base_weight, delta).T + layer.bias.double() - y.double()) ** 2).sum()
    reference.backward()
    try:
        got = grad(loss)(layer.svd_delta.detach().clone())
    except SvdtuneError:
        return  # refusing is acceptable; a silently wrong gradient is not
    torch.testing.assert_close(got.double(), delta.grad, rtol=1e-4, atol=1e-4)


def test_vmap_output_right_after_an_in_place_weight_edit():
    model, x, _ = _edited_model()
    layer = model[0]
    deltas = layer.svd_delta.detach().expand(2, 5)
    expected = x.double() @ _dense(layer.base_weight, layer.svd_delta).T + layer.bias.double()
    try:
        out = vmap(lambda d: functional_call(model, {"0.svd_delta": d}, (x,)))(deltas)
    except SvdtuneError:
        return
    torch.testing.assert_close(out[0].double(), expected, rtol=1e-4, atol=1e-4)


def test_per_sample_grads_with_the_full_parameter_dict_right_after_an_edit():
    """The functorch / Opacus pattern: vmap(grad(loss)) over {name: p.detach() for named_parameters()}."""
    model, x, y = _edited_model()
    layer = model[0]
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, xx, yy):
        return ((functional_call(model, p, (xx,)) - yy) ** 2).sum()

    try:
        got = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.unsqueeze(1), y.unsqueeze(1))["0.svd_delta"]
    except SvdtuneError:
        return
    for i in range(x.shape[0]):
        delta = layer.svd_delta.detach().double().clone().requires_grad_(True)
        out = x[i:i + 1].double() @ _dense(layer.base_weight, delta).T + layer.bias.double()
        ((out - y[i:i + 1].double()) ** 2).sum().backward()
        torch.testing.assert_close(got[i].double(), delta.grad, rtol=1e-4, atol=1e-4)


# 2. The probe (`svdtune.cache.check_factors`) bounds what a rank-k layer leaves out by next_sigma * ||x||
# for 4 random x: a Frobenius-like measure against a spectral bound. A new weight whose tail singular value
# grows past the top ones (here sigma_5 -> 3 sigma_1, same singular vectors) passes it, so the old top-4
# factors serve: delta[0] shifts the old first singular value instead of the new one. Expected: the output
# of a fresh SVD of the weight held (as after `redecompose()`); got an error of about half the output.
@pytest.mark.parametrize("how", ["functional_call", "in_place"])
def test_a_rank_k_layer_notices_a_tail_singular_value_growing_past_the_top(how):
    torch.manual_seed(0)
    model = svdtune.apply(nn.Sequential(nn.Linear(32, 32, bias=False)), targets=["0"], rank=4, progress=False)
    layer = model[0]
    with torch.no_grad():
        layer.svd_delta.copy_(torch.tensor([-1.0, 0.5, 0.3, -0.2]))
    U, S, Vh = torch.linalg.svd(layer.base_weight.detach().double())
    S[4] = 3 * S[0]
    weight = ((U * S) @ Vh).float()
    x = torch.randn(5, 32)
    expected = x.double() @ _dense(weight, layer.svd_delta.detach(), rank=4).T
    if how == "functional_call":
        out = functional_call(model, {"0.weight": weight}, (x,))
    else:
        with torch.no_grad():
            layer.base_weight.copy_(weight)
        out = model(x)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
