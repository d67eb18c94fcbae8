"""Training forwards of adapted layers, one per layer kind (see `svdtune.kinds`).

Each is exact: its output equals the original forward with the adapted weight W'.
Without autograd (``torch.no_grad``, inference) or with a trainable base weight,
each calls the class's own forward, which reads the cached W' (the base weight
itself, bit for bit, at zero deltas). With autograd they avoid building W' where
that is cheaper:

- linear (nn.Linear, transformers' Conv1D on its (out, in) view): `choose_path` picks
  the factorized, low-rank or rebuild product by multiply-add count (always the factorized
  one when the base weight is offloaded to CPU memory, see `svdtune.memory`);
- embedding: rows of U are gathered, scaled by sigma' and projected by Vh, so a
  large vocabulary never builds its (num_embeddings, dim) W' per step;
- embedding_bag: the same on the bags of U's rows (the bag is linear in the rows),
  except mode="max" and scale_grad_by_freq, which rebuild W';
- attention (nn.MultiheadAttention): W' of in_proj_weight (or q/k/v_proj_weight) is
  built once per forward and read by the class's own forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from svdtune import kernels, memory
from svdtune.kinds import LayerKind
from svdtune.formula import delta_weight
from svdtune.layers import SpectralLayer


def training_forward(kind: LayerKind, cls: type) -> Callable | None:
    """The forward an adapted ``cls`` of ``kind`` gets, or None to keep the class's own.

    A subclass with its own forward keeps it (it reads the adapted weight), except attention,
    whose forward is wrapped whatever it is.
    """
    if kind.forward == "attention":
        return _attention_forward
    own = {"linear": _linear_forward, "embedding": _embedding_forward, "embedding_bag": _bag_forward}.get(kind.forward)
    base = kind.classes()[0]
    return own if own is not None and cls.forward is base.forward else None


def choose_path(rows: int, m: int, n: int, k: int, full_rank: bool, input_grad: bool) -> str:
    """Pick the training forward of a Linear (m, n) with k deltas by multiply-add count.

    "rebuild": W' = W + U diag(shift) Vh, then a dense layer: builds and projects the
    gradient back onto the spectrum (2mnk) plus forward, dW' and maybe dx (rows*m*n each).
    "factorized" (full rank only): ((x Vh^T) * sigma') U^T, two thin matmuls each way.
    "lowrank": W x plus the k-dimensional correction, with W frozen.
    """
    thin = rows * k * (m + n) * 2 - (0 if input_grad else rows * k * n)
    if full_rank:
        costs = {"factorized": thin}
    else:
        costs = {"lowrank": rows * m * n * (2 if input_grad else 1) + thin}
    costs["rebuild"] = 2 * m * n * k + rows * m * n * (3 if input_grad else 2)
    return min(costs, key=costs.get)  # a tie goes to the thin path (measured slightly faster)


def _trains_deltas_only(layer: SpectralLayer) -> bool:
    return layer._needs_graph() and not any(layer._parameters[p].requires_grad for p in layer._params())


def _linear_forward(self: SpectralLayer, input: Tensor) -> Tensor:
    """nn.Linear's (or Conv1D's) forward with the cheapest exact path for this call."""
    if not _trains_deltas_only(self):
        return self._plain_forward(input)
    factors, base = self._factors(), self.base_matrix()  # (m, n) = (out, in); for Conv1D a transposed view
    m, n = base.shape
    rows = input.numel() // max(n, 1)
    path = "factorized" if memory.offloaded(self) else choose_path(rows, m, n, factors.sigma.numel(), factors.full_rank,
                                                                    input.requires_grad)  # offloaded: W is not here
    shift = self._shift(factors)
    if path == "rebuild":
        return kernels.linear(input, base + delta_weight(factors.U, factors.Vh, shift), self.bias)
    projected = kernels.linear(input, factors.Vh)  # (..., n) -> (..., k)
    if path == "factorized":  # W == U diag(sigma) Vh: one path through the factors
        return kernels.linear(projected * (factors.sigma + shift).to(projected.dtype), factors.U, self.bias)
    # low rank: W x + U_k diag(shift) Vh_k x; the rest of W is untouched
    correction = kernels.linear(projected * shift.to(projected.dtype), factors.U)
    return kernels.linear(input, base, self.bias) + correction


def _embedding_forward(self: SpectralLayer, input: Tensor) -> Tensor:
    """W'[input] = (U[input] * sigma') Vh (full rank) or W[input] + (U[input] * shift) Vh.

    Positions holding padding_idx get W'[padding_idx] but pass no gradient to the deltas,
    as nn.Embedding's padding row gets no gradient.
    """
    if not _trains_deltas_only(self) or self.scale_grad_by_freq:
        return self._plain_forward(input)
    factors = self._factors()
    shift = self._shift(factors)
    rows = F.embedding(input, factors.U)  # (..., k)
    coefficients = rows * ((factors.sigma + shift) if factors.full_rank else shift).to(rows.dtype)
    if self.padding_idx is not None:
        padding = (input == self.padding_idx).unsqueeze(-1)
        coefficients = torch.where(padding, coefficients.detach(), coefficients)
    out = kernels.linear(coefficients, factors.Vh.t())  # (..., k) -> (..., dim)
    return out if factors.full_rank else F.embedding(input, self.base_weight) + out


def _bag_forward(self: SpectralLayer, input: Tensor, offsets: Tensor | None = None,
                 per_sample_weights: Tensor | None = None) -> Tensor:
    """bag(W'[rows]) = bag(U[rows]) diag(sigma') Vh for sum and mean bags (linear in the rows)."""
    if not _trains_deltas_only(self) or self.mode == "max" or self.scale_grad_by_freq:
        return self._plain_forward(input, offsets, per_sample_weights)
    factors = self._factors()
    shift = self._shift(factors)

    def bag(weight: Tensor) -> Tensor:
        return F.embedding_bag(input, weight, offsets, None, 2.0, False, self.mode, False, per_sample_weights,
                               self.include_last_offset, self.padding_idx)

    bags = bag(factors.U)  # (bags, k)
    out = kernels.linear(bags * ((factors.sigma + shift) if factors.full_rank else shift).to(bags.dtype),
                         factors.Vh.t())
    return out if factors.full_rank else bag(self.base_weight) + out


def _attention_forward(self: SpectralLayer, *args, **kwargs):
    """The class's own forward, with each adapted projection weight built once for the call."""
    live = self._spectral.live
    if not self._needs_graph() or live:  # no autograd: the cached W'; nested call: already built
        return self._plain_forward(*args, **kwargs)
    live.update({param: self.adapted_weight(param) for param in self._params()})
    try:
        return self._plain_forward(*args, **kwargs)
    finally:
        live.clear()
