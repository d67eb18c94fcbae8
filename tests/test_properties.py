"""Property-based tests over random layer kinds, shapes, ranks, modes and dtypes."""

from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import svdtune
from tests.conftest import randomize_deltas
from tests.test_layers import dense_reference, plain_copy_with_weight

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


@st.composite
def layers(draw):
    """(layer, input batch) of a random supported kind and shape."""
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    kind = draw(st.sampled_from(["linear", "conv", "transposed"]))
    if kind == "linear":
        n, m = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        return nn.Linear(n, m, bias=draw(st.booleans())), torch.randn(draw(st.integers(1, 4)), n)
    dims = draw(st.integers(1, 3 if kind == "conv" else 2))
    groups = draw(st.sampled_from([1, 2]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    size = draw(st.integers(kernel, kernel + 3))
    x = torch.randn(2, cin, *([size] * dims))
    if kind == "conv":
        padding_mode = draw(st.sampled_from(["zeros", "reflect", "circular"]))
        padding = draw(st.integers(0, min(1, size - 1))) if padding_mode != "zeros" else draw(st.integers(0, 2))
        return CONVS[dims](cin, cout, kernel, stride=stride, padding=padding, groups=groups, padding_mode=padding_mode), x
    out_pad = draw(st.integers(0, stride - 1))
    return TRANSPOSED[dims](cin, cout, kernel, stride=stride, groups=groups, output_padding=out_pad), x


ranks = st.one_of(st.none(), st.integers(1, 6))
modes = st.sampled_from(["shift", "scale"])
property_settings = settings(max_examples=60, deadline=None)  # SVDs of random sizes vary in time


@property_settings
@given(layers(), ranks, modes, st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]), st.booleans())
def test_identity_at_init(case, rank, mode, dtype, training):
    layer, x = case
    model = nn.Sequential(layer.to(dtype)).train(training)
    x = x.to(dtype)
    with torch.no_grad():
        expected = model(x)
    svdtune.apply(model, targets=["0"], rank=rank, mode=mode)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


@property_settings
@given(layers(), ranks, modes, st.sampled_from([torch.float32, torch.float64]), st.integers(0, 1000))
def test_adapted_forward_equals_dense_formula(case, rank, mode, dtype, seed):
    layer, x = case
    model = nn.Sequential(layer.to(dtype))
    x = x.to(dtype)
    reference_layer = copy.deepcopy(layer)
    svdtune.apply(model, targets=["0"], rank=rank, mode=mode)
    randomize_deltas(model, seed=seed)
    weight = dense_reference(layer, layer.svd_delta, mode)
    reference = plain_copy_with_weight(reference_layer, weight)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(model(x), expected, **tol)
    torch.testing.assert_close(model(x), expected, **tol)


@property_settings
@given(layers(), ranks, modes, st.integers(0, 1000))
def test_merge_equals_adapted_and_restore_is_bit_exact(case, rank, mode, seed):
    layer, x = case
    model = nn.Sequential(layer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    svdtune.apply(model, targets=["0"], rank=rank, mode=mode)
    randomize_deltas(model, seed=seed)
    adapted = model(x).detach()
    merged = svdtune.merge(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted, rtol=1e-5, atol=1e-5)
    svdtune.restore(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
