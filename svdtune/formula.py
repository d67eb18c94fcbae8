"""The one delta formula: the adapted spectrum and the weight change it makes.

W' = W + U diag(sigma' - sigma) Vh, with sigma' from the deltas by the layer's mode. The
training forwards, W' (eval, ``layer.weight``), `merge`, `save_delta`, `merge_files`,
`combine` and `export_lora` all compute it with these functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from svdtune import kernels
from svdtune.errors import SvdtuneError
from svdtune.values import all_finite


def spectrum_shift(sigma: Tensor, delta: Tensor, scale: float, mode: str) -> Tensor:
    """sigma' - sigma for the adapted spectrum sigma', in sigma's dtype (float32/64).

    "shift": relu(sigma + s*delta) - sigma == max(s*delta, -sigma), written so that
    no cancellation occurs; "scale": sigma*(1 + s*delta) - sigma == sigma*s*delta.
    Both are exactly zero when delta is zero (sigma >= 0).

    At the boundary s*delta == -sigma (e.g. delta = 0 on a zero singular value) the shift
    takes relu's subgradient from the side that lets sigma' grow: the whole gradient passes
    to delta (``torch.maximum`` would split it in half on the tie). A NaN step stays NaN.
    """
    step = delta.to(sigma.dtype) * scale
    if mode == "shift":
        return torch.where(step < -sigma, -sigma, step)
    return sigma * step


def delta_weight(U: Tensor, Vh: Tensor, shift: Tensor) -> Tensor:
    """The weight change as a matrix: U diag(shift) Vh, (m, k) (k,) (k, n) -> (m, n)."""
    return kernels.linear(U * shift.to(U.dtype), Vh.t())  # (U diag(shift)) @ Vh


def merged_matrix(base: Tensor, U: Tensor, Vh: Tensor, shift: Tensor) -> Tensor:
    """W' = W + U diag(shift) Vh for a base matrix (m, n), in its dtype, accumulated in shift's dtype."""
    work = shift.dtype  # float32, or float64 for float64 weights: never half precision
    change = delta_weight(U.to(work), Vh.to(work), shift)
    return (base.to(work) + change).to(base.dtype)


def may_overflow(top: float, shift: Tensor, dtype: torch.dtype) -> bool:
    """Whether W' = W + U diag(shift) Vh may hold an entry beyond ``dtype``'s range: ``top`` bounds W's entries
    (max|W|, or sigma_max without reading W), and every entry of the change is at most max|shift| (the rows
    of U and the columns of Vh have norm <= 1); the margin is far above rounding."""
    reach = top + (float(shift.abs().max()) if shift.numel() else 0.0)
    return not reach < torch.finfo(dtype).max * (1 - 1e-3)


def check_finite_merge(name: str, weight: Tensor) -> None:
    """Refuse a merged weight with NaN or infinity (before anything is written or swapped)."""
    if not all_finite(weight):
        raise SvdtuneError(f"merging layer {name!r} gives non-finite weights; check its deltas and scale.")
