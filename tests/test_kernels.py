"""svdtune.kernels.linear: F.linear's values and gradients on oneDNN, and its fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import svdtune
from svdtune import kernels

onednn = pytest.mark.skipif(not kernels._onednn_works(), reason="this torch build has no working oneDNN")


@pytest.fixture
def kernel_state():
    """Restore the once-per-process kernel check after a test changes it."""
    saved = dict(kernels._state)
    yield kernels._state
    kernels._state.clear()
    kernels._state.update(saved)


def count_onednn_calls(monkeypatch) -> list[int]:
    calls = []
    original = kernels._product
    monkeypatch.setattr(kernels, "_product", lambda *a: calls.append(1) or original(*a))
    return calls


def weight_view(kind: str, m: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """An (m, n) weight as the layers pass it: contiguous, a transpose, or a slice of rows."""
    if kind == "transposed":
        return torch.randn(n, m, generator=generator).t()
    if kind == "rows":
        return torch.randn(m + 3, n, generator=generator)[1 : m + 1]
    return torch.randn(m, n, generator=generator)


def small_adapted_model(rank: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = svdtune.apply(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), targets=["*"], rank=rank)
    with torch.no_grad():
        for delta in svdtune.trainable_parameters(model):
            delta.normal_(std=0.3)
    return model


def linear_and_grads(fn, x, w, b, grad_out, needs):
    x, w = x.detach().requires_grad_(needs[0]), w.detach().requires_grad_(needs[1])
    b = None if b is None else b.detach().requires_grad_(needs[2])
    out = fn(x, w, b)
    inputs = [t for t, need in zip((x, w, b), needs) if t is not None and need]
    grads = torch.autograd.grad(out, inputs, grad_out) if inputs else ()
    return out, grads


@onednn
@settings(max_examples=60, deadline=None)
@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    kind=st.sampled_from(["contiguous", "transposed", "rows"]),
    bias=st.booleans(),
    needs=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    seed=st.integers(0, 2**16),
)
def test_linear_matches_f_linear_in_values_and_gradients(lead, m, n, kind, bias, needs, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, generator=generator)
    w = weight_view(kind, m, n, generator)
    b = torch.randn(m, generator=generator) if bias else None
    grad_out = torch.randn(*lead, m, generator=generator)
    out, grads = linear_and_grads(kernels.linear, x, w, b, grad_out, needs)
    ref_out, ref_grads = linear_and_grads(F.linear, x, w, b, grad_out, needs)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(ref_grads)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5)


@onednn
def test_cpu_float32_products_go_through_onednn(monkeypatch):
    calls = count_onednn_calls(monkeypatch)
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(5, 6, requires_grad=True)
    kernels.linear(x, w).sum().backward()
    assert len(calls) == 3  # forward, dx, dW


@onednn
def test_double_backward_matches_f_linear():
    x = torch.randn(3, 4, dtype=torch.float32)
    w = torch.randn(5, 4)

    def grad_norm(fn):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(fn(xi, wi).pow(2).sum(), xi, create_graph=True)
        (second,) = torch.autograd.grad(grad_x.pow(2).sum(), wi)
        return second

    torch.testing.assert_close(grad_norm(kernels.linear), grad_norm(F.linear), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case",
    ["float64", "bfloat16", "empty-batch", "no-in-features", "autocast"],
)
def test_everything_else_is_plain_f_linear(case, monkeypatch):
    calls = count_onednn_calls(monkeypatch)
    dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16}.get(case, torch.float32)
    rows, n = {"empty-batch": (0, 6), "no-in-features": (4, 0)}.get(case, (4, 6))
    x, w = torch.randn(rows, n, dtype=dtype), torch.randn(5, n, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        out, expected = kernels.linear(x, w), F.linear(x, w)
    assert torch.equal(out, expected) and out.dtype == expected.dtype
    assert calls == []


def test_environment_switch_turns_onednn_off(monkeypatch, kernel_state):
    monkeypatch.setenv("SVDTUNE_ONEDNN", "0")
    kernel_state["usable"] = None
    calls = count_onednn_calls(monkeypatch)
    x, w = torch.randn(4, 6), torch.randn(5, 6)
    assert torch.equal(kernels.linear(x, w), F.linear(x, w))
    assert calls == [] and kernel_state["usable"] is False


def test_a_kernel_that_disagrees_with_f_linear_is_not_used(monkeypatch, kernel_state):
    monkeypatch.setattr(kernels, "_product", lambda x, w: F.linear(x, w) + 1e-3)
    assert kernels._onednn_works() is False


def test_a_kernel_that_fails_is_not_used(monkeypatch):
    def broken(x, w):
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(kernels, "_product", broken)
    assert kernels._onednn_works() is False


@pytest.mark.parametrize("rank", [None, 3])
def test_adapted_training_forward_is_the_same_with_and_without_onednn(rank, kernel_state):
    model, x = small_adapted_model(rank), torch.randn(5, 6)

    def output_and_grads():
        out = model(x)
        return out, torch.autograd.grad(out.square().sum(), svdtune.trainable_parameters(model))

    kernel_state["usable"] = False
    plain_out, plain_grads = output_and_grads()
    kernel_state["usable"] = None
    out, grads = output_and_grads()
    torch.testing.assert_close(out, plain_out, rtol=1e-5, atol=1e-5)
    for grad, plain in zip(grads, plain_grads):
        torch.testing.assert_close(grad, plain, rtol=1e-5, atol=1e-5)


def test_torch_func_grad_and_vmap_work_and_agree_with_autograd(monkeypatch):
    model, x = small_adapted_model(), torch.randn(4, 6)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, batch):
        return torch.func.functional_call(model, p, (batch,)).square().sum()

    names = [name for name in params if name.endswith("svd_delta")]
    expected = torch.autograd.grad(loss(dict(model.named_parameters()), x), svdtune.trainable_parameters(model))
    calls = count_onednn_calls(monkeypatch)
    grads = torch.func.grad(loss)(params, x)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x.unsqueeze(1))
    assert calls == []
    for name, ref in zip(names, expected):
        torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(per_sample[name].sum(0), ref, rtol=1e-5, atol=1e-5)


def test_forward_mode_ad_and_jvp_work(monkeypatch):
    model, x = small_adapted_model(), torch.randn(4, 6)
    tangent = torch.randn(4, 6)
    calls = count_onednn_calls(monkeypatch)
    out, out_tangent = torch.func.jvp(model, (x,), (tangent,))
    with torch.autograd.forward_ad.dual_level():
        dual_out = model(torch.autograd.forward_ad.make_dual(x, tangent))
        dual_tangent = torch.autograd.forward_ad.unpack_dual(dual_out).tangent
    assert calls == []
    eps = 1e-3  # the tangent is the directional derivative: compare with central differences in float64
    reference = (model.double()(x.double() + eps * tangent.double()) - model(x.double() - eps * tangent.double())) / (2 * eps)
    torch.testing.assert_close(out_tangent.double(), reference, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(dual_tangent, out_tangent)


def test_tensor_subclasses_and_jit_tracing_use_f_linear(monkeypatch):
    class Tagged(torch.Tensor):
        pass

    calls = count_onednn_calls(monkeypatch)
    x, w = torch.randn(4, 6), torch.randn(5, 6)
    assert torch.equal(kernels.linear(x.as_subclass(Tagged), w), F.linear(x, w))
    assert calls == []
    traced = torch.jit.trace(lambda a: kernels.linear(a, w), (x,), check_trace=False)
    assert calls == [] and "linear" in str(traced.graph)


@onednn
@pytest.mark.parametrize("rank", [None, 3])
def test_the_kernel_keeps_no_more_for_backward_than_f_linear(rank, kernel_state):
    model, x = small_adapted_model(rank), torch.randn(8, 6)

    def saved_numel() -> int:
        saved = {}

        def pack(tensor):
            saved[(tensor.data_ptr(), tensor.shape)] = tensor.numel()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(x).sum().backward()
        return sum(saved.values())

    kernel_state["usable"] = False
    plain = saved_numel()
    kernel_state["usable"] = None
    assert saved_numel() <= plain


@onednn
@pytest.mark.parametrize("rank", [None, 3])
def test_second_derivatives_through_frozen_factors_match_f_linear(rank, kernel_state):
    model, x = small_adapted_model(rank), torch.randn(4, 6, requires_grad=True)

    def penalty_grads():  # a gradient penalty: d/d(deltas) of |d out / d x|^2
        (grad_x,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), svdtune.trainable_parameters(model))

    kernel_state["usable"] = False
    plain = penalty_grads()
    kernel_state["usable"] = None
    for grad, ref in zip(penalty_grads(), plain):
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-5)


@onednn
def test_in_place_ops_on_the_output_work(monkeypatch):
    model = svdtune.apply(nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(inplace=True), nn.Linear(5, 2)), targets=["*"])
    calls = count_onednn_calls(monkeypatch)
    model(torch.randn(4, 6)).sum().backward()
    x, w = torch.randn(2, 3, 6), torch.randn(5, 6, requires_grad=True)
    kernels.linear(x, w).relu_().sum().backward()
    assert calls and all(p.grad is not None for p in svdtune.trainable_parameters(model))
    torch.testing.assert_close(w.grad, torch.autograd.grad(F.linear(x, w).relu().sum(), w)[0])


@onednn
def test_overlapping_inputs_such_as_unfold_windows():
    windows = torch.randn(40).unfold(0, 7, 2)  # (17, 7) with strides (2, 1): rows overlap
    w = torch.randn(5, 7)
    out, grads = linear_and_grads(kernels.linear, windows, w, None, torch.ones(17, 5), (True, True, False))
    ref_out, ref_grads = linear_and_grads(F.linear, windows, w, None, torch.ones(17, 5), (True, True, False))
    torch.testing.assert_close(out, ref_out)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref)


@pytest.mark.parametrize(
    "shapes",
    [((4, 7), (5, 6), None), ((4, 6), (5, 6), (4, 5)), ((4, 6), (6,), None), ((), (5, 1), None)],
    ids=["mismatch", "batched-bias", "1-d-weight", "0-d-input"],
)
def test_other_shapes_behave_exactly_as_f_linear(shapes, monkeypatch):
    calls = count_onednn_calls(monkeypatch)
    x, w = torch.randn(shapes[0]), torch.randn(shapes[1])
    b = None if shapes[2] is None else torch.randn(shapes[2])
    try:
        expected = F.linear(x, w, b)
    except RuntimeError as error:
        with pytest.raises(RuntimeError, match=str(error).split("(")[0]):
            kernels.linear(x, w, b)
    else:
        assert torch.equal(kernels.linear(x, w, b), expected)
    assert calls == []


def test_switching_onednn_off_in_torch_and_dispatch_modes_use_f_linear(monkeypatch):
    calls = count_onednn_calls(monkeypatch)
    x, w = torch.randn(4, 6), torch.randn(5, 6, requires_grad=True)
    with torch.backends.mkldnn.flags(enabled=False):
        kernels.linear(x, w).sum().backward()
    with FlopCounterMode(display=False) as counter:
        kernels.linear(x, w)
    assert calls == [] and counter.get_total_flops() == 2 * 4 * 6 * 5


def test_small_products_use_f_linear_by_default(monkeypatch):
    monkeypatch.undo()  # the default threshold, not the suite's 0
    calls = count_onednn_calls(monkeypatch)
    small, w = torch.randn(32, 64), torch.randn(64, 64, requires_grad=True)
    kernels.linear(small, w).sum().backward()
    assert calls == []
    if kernels._onednn_works():
        large = torch.randn(kernels.MIN_MULTIPLY_ADDS // 64, 64)
        kernels.linear(large, w).sum().backward()
        assert len(calls) == 3
