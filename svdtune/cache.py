"""On-disk cache of decompositions (placeholder until the cache lands: computes every time)."""

from __future__ import annotations

from torch import Tensor

from svdtune.decompose import Decomposition, decompose


def decompose_cached(weight: Tensor, rank: int | None, cache_dir: str | None) -> Decomposition:
    """`decompose`, reusing a stored result from ``cache_dir`` when there is one."""
    return decompose(weight, rank)
