"""Per-layer maths: exact at init, equal to the dense formula, trainable, mergeable, restorable."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import svdtune
from svdtune.layers import SpectralLayer
from tests.conftest import LAYERS, make_layer, randomize_deltas

KINDS = sorted(LAYERS)


def wrap(layer: nn.Module) -> nn.Sequential:
    return nn.Sequential(layer)


def dense_reference(layer: nn.Module, delta: torch.Tensor, mode: str, scale: float = 1.0) -> torch.Tensor:
    """W' from an independent float64 numpy SVD: the rest of W plus U_k diag(f(sigma_k, delta)) V_k^T."""
    weight = layer._parameters["weight"].detach().double().numpy()  # the frozen base, not the adapted .weight
    matrix = weight.reshape(weight.shape[0], -1)
    U, S, Vh = np.linalg.svd(matrix, full_matrices=False)
    k = delta.numel()
    d = delta.detach().double().numpy() * scale
    new = np.maximum(S[:k] + d, 0) if mode == "shift" else S[:k] * (1 + d)
    adapted = matrix - (U[:, :k] * S[:k]) @ Vh[:k] + (U[:, :k] * new) @ Vh[:k]
    return torch.from_numpy(adapted.reshape(weight.shape))


def plain_copy_with_weight(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A plain layer of the same kind, hyperparameters and bias, holding ``weight``."""
    plain = copy.deepcopy(layer)
    if isinstance(plain, SpectralLayer):
        svdtune.restore(nn.Sequential(plain))
    with torch.no_grad():
        plain.weight.copy_(weight.to(plain.weight.dtype))
    return plain


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["shift", "scale"])
@pytest.mark.parametrize("training", [True, False])
def test_exact_at_init_bit_for_bit(kind, mode, training):
    layer, x = make_layer(kind)
    model = wrap(layer).train(training)
    with torch.no_grad():
        expected = model(x)
    svdtune.apply(model, targets=["0"], mode=mode)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["shift", "scale"])
@pytest.mark.parametrize("rank", [None, 2])
def test_forward_equals_dense_formula(kind, mode, rank):
    layer, x = make_layer(kind, seed=1)
    model = wrap(layer)
    svdtune.apply(model, targets=["0"], mode=mode, rank=rank)
    randomize_deltas(model, seed=2)
    delta = model[0].svd_delta
    reference = plain_copy_with_weight(layer, dense_reference(layer, delta, mode))
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)  # the training path


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_delta(kind):
    layer, x = make_layer(kind, seed=3)
    model = svdtune.apply(wrap(layer), targets=["0"])
    randomize_deltas(model, std=0.05)
    model(x).square().sum().backward()
    delta = model[0].svd_delta
    assert delta.grad is not None and torch.isfinite(delta.grad).all()
    assert (delta.grad != 0).all(), delta.grad
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith("svd_delta"))


@pytest.mark.parametrize("rank", [None, 3])
def test_adamw_drives_toy_regression_loss_down(rank):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 1))
    teacher = svdtune.apply(copy.deepcopy(model), targets=["*"], rank=rank)
    randomize_deltas(teacher, std=0.5)  # reachable by spectral shifts alone
    x = torch.randn(128, 6)
    with torch.no_grad():
        y = teacher(x)
    svdtune.apply(model, targets=["*"], rank=rank)
    optimizer = torch.optim.AdamW(svdtune.trainable_parameters(model), lr=3e-2)
    losses = []
    for _ in range(50):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses


@pytest.mark.parametrize("kind", KINDS)
def test_restore_gives_back_same_objects_and_bits_after_training(kind):
    layer, x = make_layer(kind, seed=4)
    model = wrap(layer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = {n: p for n, p in model.named_parameters()}
    cls = type(layer)
    svdtune.apply(model, targets=["0"])
    optimizer = torch.optim.AdamW(svdtune.trainable_parameters(model), lr=0.1)
    for _ in range(3):
        model(x).square().mean().backward()
        optimizer.step()
    svdtune.restore(model)
    assert model[0] is layer and type(layer) is cls
    assert not any(isinstance(m, SpectralLayer) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p is params_before[n] and p.requires_grad for n, p in model.named_parameters())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["shift", "scale"])
def test_merge_equals_adapted_and_leaves_plain_layers(kind, mode):
    layer, x = make_layer(kind, seed=5)
    model = wrap(layer)
    cls = type(layer)
    svdtune.apply(model, targets=["0"], mode=mode)
    randomize_deltas(model, seed=6)
    adapted = model(x).detach()
    svdtune.merge(model)
    assert type(model[0]) is cls and not any(isinstance(m, SpectralLayer) for m in model.modules())
    assert not any("svd_delta" in k for k in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    fresh = wrap(make_layer(kind)[0])
    fresh.load_state_dict(model.state_dict())  # loads into the original architecture
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), adapted, rtol=1e-5, atol=1e-5)


def test_set_scale_zero_is_the_base_model_and_one_is_as_trained():
    layer, x = make_layer("linear", seed=7)
    model = wrap(layer)
    with torch.no_grad():
        base = model(x)
    svdtune.apply(model, targets=["0"])
    randomize_deltas(model)
    with torch.no_grad():
        trained = model(x)
        svdtune.set_scale(model, 0.0)
        assert torch.equal(model(x), base)
        svdtune.set_scale(model, 0.5)
        half = model(x)
        svdtune.set_scale(model, 1.0)
        assert torch.equal(model(x), trained)
    assert not torch.allclose(half, trained) and not torch.allclose(half, base)
    reference = plain_copy_with_weight(layer, dense_reference(layer, model[0].svd_delta, "shift", scale=0.5))
    with torch.no_grad():
        torch.testing.assert_close(half, reference(x), rtol=1e-4, atol=1e-5)


def test_singular_values_before_and_after():
    layer, _ = make_layer("linear", seed=8)
    model = svdtune.apply(wrap(layer), targets=["0"], rank=4)
    randomize_deltas(model, std=0.1)
    sigma, adapted = svdtune.singular_values(model)["0"]
    expected = np.linalg.svd(layer.base_weight.detach().double().numpy(), compute_uv=False)[:4]
    np.testing.assert_allclose(sigma.numpy(), expected, rtol=1e-5)
    torch.testing.assert_close(adapted, torch.relu(sigma + model[0].svd_delta.detach()))


def test_custom_subclass_forward_sees_adapted_weight():
    class Masked(nn.Linear):
        def forward(self, x):
            return nn.functional.linear(x, self.weight * 2.0, self.bias)

    torch.manual_seed(0)
    layer = Masked(5, 4)
    x = torch.randn(2, 5)
    model = svdtune.apply(wrap(layer), targets=["0"])
    randomize_deltas(model)
    with torch.no_grad():
        expected = nn.functional.linear(x, dense_reference(layer, layer.svd_delta, "shift").float() * 2, layer.bias)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_inference_mode_gives_the_base_output_and_leaves_the_layer_usable(kind):
    layer, x = make_layer(kind)
    with torch.no_grad():
        expected = layer(x)
    adapted = svdtune.apply(nn.Sequential(copy.deepcopy(layer)), targets=["0"])
    with torch.inference_mode():
        assert torch.equal(adapted(x), expected)
    with torch.no_grad():
        assert torch.equal(adapted(x), expected)  # the cache built under inference_mode serves here too
    adapted(x).sum().backward()
    assert adapted[0].svd_delta.grad is not None
