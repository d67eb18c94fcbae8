"""Matrix products of the training forward: ``linear``, a drop-in for ``F.linear``.

On CPU in float32, ``linear`` runs its forward and backward products through
oneDNN's inner-product kernel instead of the BLAS behind ``F.linear``. The
maths is the same (float32 in, float32 accumulation); only the kernel differs,
so results agree with ``F.linear`` to float32 rounding, not bit for bit. On the
AMD EPYC machines this project measures on, oneDNN runs these products about
2x faster than MKL's sgemm (``benchmarks/train_step.py`` prints both).

Everything else goes to ``F.linear`` unchanged: small products (under
`MIN_MULTIPLY_ADDS`, where a call's fixed cost dominates), CUDA, half precision,
autocast, ``torch.compile``, ``torch.func`` transforms, forward-mode AD, dispatch
modes, tensor subclasses, empty shapes, and builds without oneDNN. A check at
first use compares the two kernels on a small problem and keeps ``F.linear`` if
they disagree. ``SVDTUNE_ONEDNN=0`` in the environment always uses ``F.linear``.

Users: an adapted Linear's training forward, and `formula.delta_weight`. Under
``torch.no_grad`` an adapted layer calls ``F.linear`` on its cached W', and at
zero deltas that W' is the base weight exactly, so the output equals the base
model's bit for bit.
"""

from __future__ import annotations

import os

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _python_dispatch

_state: dict[str, bool | None] = {"usable": None}  # None: not checked yet
# Below this many multiply-adds per product, the Function's fixed cost (~50 us a call on this
# project's CPU) outweighs the faster kernel: the forward and backward of one product break
# even at about rows x 256 x 256 with 64 rows, and F.linear is 2-3x faster on 64-wide layers.
MIN_MULTIPLY_ADDS = 1 << 22
_PLAIN = (Tensor, nn.Parameter)


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(input, weight, bias)`` with autograd, on the fastest kernel available.

    ``weight`` may be any strided view (a transpose, a slice of rows).
    """
    if not _use_onednn(input, weight, bias):
        return F.linear(input, weight, bias)
    # the Function sees 2-D rows; the reshape outside it is an ordinary view that in-place ops may modify
    rows = _OneDnnLinear.apply(input.reshape(-1, input.shape[-1]), weight, bias)
    return rows.reshape(*input.shape[:-1], weight.shape[0])


def _use_onednn(input: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    # cheapest tests first: this runs for every product, and most small ones stop at the second
    if type(input) not in _PLAIN or type(weight) not in _PLAIN or (bias is not None and type(bias) not in _PLAIN):
        return False  # tensor subclasses and tracing proxies go through F.linear
    if torch.jit.is_tracing():
        return False  # (before reading shapes, which jit.trace would record as constants, with a warning)
    products = input.numel() * weight.shape[0] if weight.dim() == 2 else 0
    if products == 0 or products < MIN_MULTIPLY_ADDS:
        return False  # empty or small products: F.linear's lower fixed cost wins
    tensors = (input, weight) if bias is None else (input, weight, bias)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors) or not _plain_shapes(input, weight, bias):
        return False  # F.linear broadcasts or raises its own message for other shapes
    if _tracing_or_transforming() or torch.is_autocast_enabled("cpu") or not torch.backends.mkldnn.enabled:
        return False  # autocast decides the dtype of F.linear's inputs; oneDNN switched off by the user
    if _state["usable"] is None:
        _state["usable"] = _onednn_works()
    return bool(_state["usable"])


def _plain_shapes(input: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """input (..., n), weight (m, n), bias (m,) or None: the shapes the kernel takes."""
    if input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        return False
    return bias is None or tuple(bias.shape) == (weight.shape[0],)


def _tracing_or_transforming() -> bool:
    """torch.compile, torch.func transforms (grad, vmap, jvp), forward-mode AD and Python dispatch
    modes (FlopCounterMode, FakeTensorMode...): they need F.linear's registered formulas, which a
    custom autograd.Function lacks (jit tracing is checked earlier, in `_use_onednn`)."""
    return (
        torch.compiler.is_compiling()
        or torch._C._functorch.peek_interpreter_stack() is not None
        or forward_ad._current_level >= 0
        or _python_dispatch._get_current_dispatch_mode() is not None
    )


def _onednn_works() -> bool:
    """True when this build has oneDNN, it is not switched off, and it agrees with F.linear."""
    if os.environ.get("SVDTUNE_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        x, w = (torch.randn(shape, generator=generator) for shape in ((5, 7), (3, 7)))
        return torch.allclose(_product(x, w.t().contiguous().t()), F.linear(x, w), rtol=1e-5, atol=1e-5)
    except (RuntimeError, AttributeError):  # an op missing or refusing in this build
        return False


def _product(rows: Tensor, weight: Tensor) -> Tensor:
    """rows @ weight.T for 2-D rows (r, n) and weight (m, n), by oneDNN (no autograd): (r, m)."""
    return torch.ops.mkldnn._linear_pointwise(_dense(rows), _dense(weight), None, "none", [], "")


def _dense(tensor: Tensor) -> Tensor:
    """The tensor itself if its elements fill memory without overlap or gaps (in any dimension
    order: transposes are fine), else a contiguous copy (oneDNN refuses e.g. ``unfold`` windows)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(tensor.stride(), tensor.shape) if sz != 1):
        if stride != expected:
            return tensor.contiguous()
        expected *= size
    return tensor


class _OneDnnLinear(torch.autograd.Function):
    """F.linear's forward and backward on 2-D rows, each product by oneDNN."""

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        needs_rows, needs_weight, _ = ctx.needs_input_grad
        # as F.linear: keep x only for dW and W only for dx (a frozen W keeps no activation alive)
        ctx.save_for_backward(rows if needs_weight else None, weight if needs_rows else None)
        out = _product(rows, weight)
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        rows, weight = ctx.saved_tensors
        needs_rows, needs_weight, needs_bias = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            return _plain_backward(grad_out, rows, weight, ctx.needs_input_grad)
        grad_rows = _product(grad_out, weight.t()) if needs_rows else None  # (r, m) @ (m, n)
        grad_weight = _product(grad_out.t(), rows.t()) if needs_weight else None  # dW (m, n) = dy.T @ x
        grad_bias = grad_out.sum(0) if needs_bias else None
        return grad_rows, grad_weight, grad_bias


def _plain_backward(grad_out: Tensor, rows: Tensor | None, weight: Tensor | None, needs: tuple[bool, ...]):
    """The same gradients from differentiable ops, so that they can be differentiated again."""
    return (
        grad_out @ weight if needs[0] else None,
        grad_out.t() @ rows if needs[1] else None,
        grad_out.sum(0) if needs[2] else None,
    )
