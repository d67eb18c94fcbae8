"""Repeated singular values: where a delta depends on which singular vectors the SVD picked.

Where singular values repeat (up to SVD noise), any rotation of their singular
vectors is a valid SVD, and deltas that differ between them mean what they meant
in training only along the very vectors training used. Turning them by an angle
t changes the merged weight by up to |shift_i - shift_j| * sin(t) in spectral norm.

So a delta file records, for each run of repeated values whose shifts differ by
more than MATERIAL * sigma_max, a hash of training's vectors (to recognise the
very same SVD) and their *probes*: dot products with fixed vectors, from which
loading estimates how far its own SVD's vectors turned (see docs/format.md).
Loading warns only when the merged weight can move by more than MATERIAL * sigma_max.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from svdtune import container

DEGENERATE_ULPS = 32  # singular values closer than 32 * eps * sigma_max count as repeated (SVD noise level)
# W' may move by this fraction of sigma_max before it matters: LAPACK alone moves well-separated
# singular vectors by ~1e-4 rad between thread counts, which moves W' by ~1e-4 * shift.
MATERIAL = 1e-3
GOLDEN = (math.sqrt(5) - 1) / 2
PROBES = 2  # probe vectors per side (U and V)


@dataclass(frozen=True)
class Basis:
    """Training's singular vectors for one run of repeated singular values with different deltas.

    Attributes:
        columns: the indices of those singular vectors (consecutive, ascending, all tuned).
        sha256: hex SHA-256 of U's columns then Vh's rows at ``columns``, as float32.
        probes: for each column j in order, u_j . p_1, u_j . p_2, v_j . q_1, v_j . q_2 (see `probe_vector`).
    """

    columns: tuple[int, ...]
    sha256: str
    probes: tuple[float, ...]


def repeated_pairs(sigma: Tensor, shift: Tensor, next_sigma: float | None = None) -> list[int]:
    """The i where singular values i and i+1 are equal up to SVD noise but get shifts that differ
    by more than MATERIAL * sigma_max.

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


def probe_vector(length: int, which: int) -> Tensor:
    """The fixed unit vector p_which (which = 1, 2, ...) of a length: entries cos(2 pi frac(i * which * GOLDEN)),
    i = 1..length, normalised; float64 on the CPU."""
    index = torch.arange(1, length + 1, dtype=torch.float64)
    vector = torch.cos(2 * math.pi * torch.frac(index * which * GOLDEN))
    return vector / vector.norm()


def basis_of(U: Tensor, Vh: Tensor, pairs: list[int]) -> tuple[Basis, ...]:
    """The `Basis` runs to record for the repeated pairs ``pairs`` of a decomposition with U (m, k)."""
    return tuple(Basis(run, _sha256(U, Vh, run), _probes(U, Vh, run)) for run in repeated_runs(pairs, U.shape[1]))


def basis_changes(
    recorded: tuple[Basis, ...], U: Tensor, Vh: Tensor, shift: Tensor, pairs: list[int], top: float, untuned_next: bool
) -> list[tuple[tuple[int, ...], float]]:
    """(columns, bound) for each run of tuned singular vectors whose turn since training can move
    W' by more than MATERIAL * top in spectral norm; bound = spread of the run's shifts * sin(angle).

    Recorded runs with the very same vectors (hash) are fine; for others the angle is estimated
    from the probes; runs of repeated values no recorded run covers may have turned by any angle.

    Args:
        recorded: the runs the delta file recorded.
        U, Vh: (m, k) and (k, n), this SVD's tuned singular vectors.
        shift: (k,) sigma' - sigma.
        pairs: this SVD's `repeated_pairs`.
        top: sigma_max.
        untuned_next: the layer has a singular value after the k tuned ones (whose shift is 0).
    """
    k, changes = U.shape[1], []
    for run in recorded:
        if run.columns[-1] >= k:  # this decomposition does not tune those vectors: any angle
            angle = math.pi / 2
        elif _sha256(U, Vh, run.columns) == run.sha256:
            continue
        else:
            angle = turn_angle(run.probes, _probes(U, Vh, run.columns))
        changes.append((run.columns, _spread(run.columns, shift, untuned_next) * math.sin(angle)))
    covered = {c for run in recorded for c in run.columns}
    for columns in repeated_runs(pairs, k):
        if not set(columns) <= covered:
            changes.append((columns, _spread(columns, shift, untuned_next)))
    return [(columns, bound) for columns, bound in changes if bound > MATERIAL * top]


def turn_angle(before: tuple[float, ...], after: tuple[float, ...]) -> float:
    """The largest angle (radians, at most pi/2) a run's vectors turned, from their probes.

    Each probe vector p sees the run's vectors as a point p . [u_1..u_c]; a rotation by t
    moves that point along a chord of 2 sin(t/2) times its length. Probes that see almost
    nothing (length < 1e-9) are skipped; if all do, the angle is unknown: pi/2.
    """
    c = len(before) // (2 * PROBES)
    old, new = (torch.tensor(p, dtype=torch.float64).reshape(c, 2 * PROBES) for p in (before, after))
    length, chord = old.norm(dim=0), (new - old).norm(dim=0)
    seen = length > 1e-9
    if not bool(seen.any()):
        return math.pi / 2
    ratio = float((chord[seen] / (2 * length[seen])).max().clamp(max=1.0))
    return min(2 * math.asin(ratio), math.pi / 2)


def _sha256(U: Tensor, Vh: Tensor, columns: tuple[int, ...]) -> str:
    """Hex SHA-256 of U[:, columns] then Vh[columns], as float32."""
    index = torch.tensor(columns, dtype=torch.long, device=U.device)
    digest = hashlib.sha256(container.tensor_bytes(U.detach().index_select(1, index).to(torch.float32)))
    digest.update(container.tensor_bytes(Vh.detach().index_select(0, index).to(torch.float32)))
    return digest.hexdigest()


def _probes(U: Tensor, Vh: Tensor, columns: tuple[int, ...]) -> tuple[float, ...]:
    """(4c,): per column, its u's dot products with p_1, p_2 and its v's with q_1, q_2."""
    u = U.detach()[:, list(columns)].to("cpu", torch.float64)  # (m, c)
    v = Vh.detach()[list(columns)].to("cpu", torch.float64).T  # (n, c)
    sides = [u.T @ probe_vector(u.shape[0], j) for j in range(1, PROBES + 1)]
    sides += [v.T @ probe_vector(v.shape[0], j) for j in range(1, PROBES + 1)]
    return tuple(torch.stack(sides, dim=1).flatten().tolist())


def _spread(run: tuple[int, ...], shift: Tensor, untuned_next: bool) -> float:
    """max - min of the run's shifts; a run ending at the last tuned value pairs with a shift of 0."""
    values = shift[list(run)].tolist() + ([0.0] if untuned_next and run[-1] == shift.numel() - 1 else [])
    return max(values) - min(values)
