"""Repeated singular values: where a delta depends on which singular vectors the SVD picked.

Where singular values repeat (up to SVD noise), any rotation of their singular
vectors is a valid SVD, and deltas that differ between them mean what they meant
in training only along the very vectors training used. Rotating them by an angle
t changes the merged weight by up to |shift_i - shift_j| * sin(t) in spectral norm.
A delta file therefore records a hash of training's vectors for each run of
repeated values whose shifts differ materially, and loading or merging compares it
with the vectors of its own SVD (see docs/format.md).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from svdtune import container

DEGENERATE_ULPS = 32  # singular values closer than 32 * eps * sigma_max count as repeated (SVD noise level)
MATERIAL = 1e-4  # shifts that differ by more than this * sigma_max could change W' beyond float noise


@dataclass(frozen=True)
class Basis:
    """The singular vectors of one run of repeated singular values that got different deltas.

    Within such a subspace any rotation of the vectors is a valid SVD, and the deltas
    only mean what they meant in training along the very vectors training used.

    Attributes:
        columns: the indices of those singular vectors (consecutive, ascending, all tuned).
        sha256: hex SHA-256 of U's columns then Vh's rows at ``columns``, as float32.
    """

    columns: tuple[int, ...]
    sha256: str



def repeated_pairs(sigma: Tensor, shift: Tensor, next_sigma: float | None = None) -> list[int]:
    """The i where singular values i and i+1 are equal up to SVD noise but get materially different
    shifts (by more than MATERIAL * sigma_max).

    Args:
        sigma: (k,) descending singular values that get a shift.
        shift: (k,) sigma' - sigma.
        next_sigma: the largest singular value that gets no shift (k < min(m, n)), or None.
    """
    values, shifts = sigma.detach().double().cpu(), shift.detach().double().cpu()
    if next_sigma is not None:
        values = torch.cat([values, values.new_tensor([float(next_sigma)])])
        shifts = torch.cat([shifts, shifts.new_tensor([0.0])])
    if values.numel() < 2:
        return []
    top = float(values[0]) if float(values[0]) > 0 else 1.0
    close = (values[:-1] - values[1:]) <= DEGENERATE_ULPS * torch.finfo(sigma.dtype).eps * top
    differ = (shifts[:-1] - shifts[1:]).abs() > MATERIAL * top
    return torch.nonzero(close & differ).flatten().tolist()


def basis_sha256(U: Tensor, Vh: Tensor, columns: tuple[int, ...]) -> str:
    """Hex SHA-256 of U[:, columns] then Vh[columns], as float32 (see `Basis`)."""
    index = torch.tensor(columns, dtype=torch.long, device=U.device)
    digest = hashlib.sha256(container.tensor_bytes(U.detach().index_select(1, index).to(torch.float32)))
    digest.update(container.tensor_bytes(Vh.detach().index_select(0, index).to(torch.float32)))
    return digest.hexdigest()


def repeated_runs(pairs: list[int], k: int) -> list[tuple[int, ...]]:
    """The tuned columns that ``pairs`` (from `repeated_pairs`) join, as runs of consecutive indices.

    E.g. pairs [1, 2, 5] with k = 7 give [(1, 2, 3), (5, 6)]; a pair (k-1, k) across the
    last tuned value gives (k-1,), since only tuned vectors enter the merged weight.
    """
    runs: list[list[int]] = []
    for i in pairs:
        columns = [j for j in (i, i + 1) if j < k]
        if runs and runs[-1][-1] >= i:
            runs[-1].extend(j for j in columns if j > runs[-1][-1])
        else:
            runs.append(columns)
    return [tuple(run) for run in runs]


def basis_of(U: Tensor, Vh: Tensor, pairs: list[int]) -> tuple[Basis, ...]:
    """The `Basis` runs to record for the repeated pairs ``pairs`` of a decomposition with U (m, k)."""
    return tuple(Basis(run, basis_sha256(U, Vh, run)) for run in repeated_runs(pairs, U.shape[1]))


def basis_changes(
    recorded: tuple[Basis, ...], U: Tensor, Vh: Tensor, shift: Tensor, pairs: list[int], top: float, untuned_next: bool
) -> list[tuple[tuple[int, ...], float]]:
    """(columns, spread of their shifts) for each run of tuned singular vectors that may differ from
    training's by more than MATERIAL * top in its effect on W': runs recorded in training whose
    vectors differ now (bit for bit), and runs of repeated values no recorded run covers.

    Args:
        recorded: the runs the delta file recorded.
        U, Vh: (m, k) and (k, n), this SVD's tuned singular vectors.
        shift: (k,) sigma' - sigma.
        pairs: this SVD's `repeated_pairs`.
        top: sigma_max.
        untuned_next: the layer has a singular value after the k tuned ones (whose shift is 0).
    """
    k = U.shape[1]
    changed = [b.columns for b in recorded if b.columns[-1] >= k or basis_sha256(U, Vh, b.columns) != b.sha256]
    covered = {c for b in recorded for c in b.columns}
    runs = changed + [run for run in repeated_runs(pairs, k) if not set(run) <= covered]
    spreads = [(run, _spread(run, shift, untuned_next)) for run in runs]
    return [(run, spread) for run, spread in spreads if spread > MATERIAL * top]


def _spread(run: tuple[int, ...], shift: Tensor, untuned_next: bool) -> float:
    """max - min of the run's shifts; a run ending at the last tuned value pairs with a shift of 0."""
    values = shift[list(run)].tolist() + ([0.0] if untuned_next and run[-1] == shift.numel() - 1 else [])
    return max(values) - min(values)
