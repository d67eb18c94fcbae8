"""Degenerate layers: the apply warning for all-zero and rank-deficient weights, and the shift's
gradient on a zero singular value against a dense reference and a finite difference."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import svdtune
from svdtune.formula import spectrum_shift


def model_with(head_weight: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, head_weight.shape[0]))
    with torch.no_grad():
        model[2].weight.copy_(head_weight)
    return model


def degenerate_warnings(model: nn.Module, **kwargs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        svdtune.apply(model, ["0", "2"], **kwargs)
    return [str(w.message) for w in caught if "numerically zero singular values" in str(w.message)]


def test_an_all_zero_weight_is_named_with_a_pointer_to_trainable():
    (message,) = degenerate_warnings(model_with(torch.zeros(4, 8)))  # as torchvision's ViT heads.head
    assert "'2' (all-zero weight)" in message and "trainable=['2']" in message and "'0'" not in message


def test_a_rank_deficient_weight_says_how_many_values_are_zero():
    torch.manual_seed(1)
    low_rank = torch.randn(5, 2) @ torch.randn(2, 8)  # rank 2 of min(5, 8) = 5
    (message,) = degenerate_warnings(model_with(low_rank), mode="scale")
    assert "'2' (3 of 5 zero)" in message and "never moves in mode 'scale'" in message
    (message,) = degenerate_warnings(model_with(low_rank), rank=3)  # only the tuned ones count
    assert "'2' (1 of 3 zero)" in message


def test_a_full_rank_model_gets_no_warning():
    torch.manual_seed(2)
    assert degenerate_warnings(model_with(torch.randn(4, 8))) == []


def test_spectrum_shift_is_exactly_zero_at_zero_delta_and_relu_elsewhere():
    sigma = torch.tensor([2.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    assert torch.equal(spectrum_shift(sigma, torch.zeros(4), 1.0, "shift"), torch.zeros(4, dtype=torch.float64))
    delta = torch.tensor([-3.0, 0.25, 0.5, -0.5], dtype=torch.float64)
    torch.testing.assert_close(spectrum_shift(sigma, delta, 1.0, "shift"), torch.relu(sigma + delta) - sigma)
    assert torch.isnan(spectrum_shift(sigma, torch.tensor([float("nan"), 0, 0, 0]), 1.0, "shift")[0])


@pytest.mark.filterwarnings("ignore:layers .* numerically zero singular values")
@pytest.mark.parametrize("rank, batch", [(None, 1), (None, 64), (2, 1), (2, 64)], ids=["full-1", "full-64", "low-1", "low-64"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_the_whole_gradient_passes_at_a_zero_singular_value(rank, batch, scale):
    """At sigma = 0 and delta = 0, d loss / d delta_i = s * u_i^T (dL/dW') v_i: relu's derivative from
    the side where sigma' grows (torch.maximum would give half of it). Covers every forward path."""
    torch.manual_seed(3)
    layer = nn.Linear(8, 5).double()
    with torch.no_grad():
        layer.weight.zero_()
    x, target = torch.randn(batch, 8, dtype=torch.float64), torch.randn(batch, 5, dtype=torch.float64)
    model = svdtune.apply(nn.Sequential(copy.deepcopy(layer)), ["0"], rank=rank)
    svdtune.set_scale(model, scale)
    F.mse_loss(model(x), target).backward()
    grad = model[0].svd_delta.grad

    dense = layer.weight.detach().clone().requires_grad_(True)  # W' = 0 at delta = 0
    F.mse_loss(F.linear(x, dense, layer.bias), target).backward()
    factors = model[0].spectral_factors()
    expected = scale * torch.einsum("mk,mn,kn->k", factors.U, dense.grad, factors.Vh)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    assert float(expected.abs().max()) > 1e-3  # the test can fail: the gradient is not zero

    # and a one-sided finite difference on the side where sigma' = relu(s * delta) grows (delta > 0)
    h, i = 1e-7, int(expected.abs().argmax())
    with torch.no_grad():
        before = F.mse_loss(model(x), target)
        model[0].svd_delta[i] += h
        after = F.mse_loss(model(x), target)
    assert float((after - before) / h) == pytest.approx(float(expected[i]), rel=1e-4)
