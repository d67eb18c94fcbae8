"""The frozen SVD of a weight matrix: W = U diag(sigma) Vh, truncated to a rank.

`decompose` takes the matrix (m, n) a layer's kind views its weight as (see
`svdtune.kinds`), or any weight, viewed as ``weight.reshape(weight.shape[0], -1)``
(the view of Linear, ConvNd and ConvTransposeNd weights).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from svdtune.errors import SvdtuneError

SLOW_SVD_ENTRIES = 10**8  # a full SVD of a matrix with more entries than this gets a warning with its expected time
_CALIBRATION = (1024, 512)  # the matrix `full_svd_seconds` times once
_seconds_per_unit: list[float] = []  # measured seconds per m * n * min(m, n), once per process


@dataclass(eq=False)
class Decomposition:
    """Top-k singular triplets of a weight matrix (m, n), k <= min(m, n).

    Attributes:
        U: (m, k) left singular vectors, in the weight's dtype and device.
        sigma: (k,) singular values, descending, float32 (float64 for float64 weights).
        Vh: (k, n) right singular vectors, in the weight's dtype and device.
        full_rank: k == min(m, n), so U diag(sigma) Vh reproduces the whole matrix.
        next_sigma: the largest singular value left out (sigma_k), None at full rank; it tells
            whether the last kept singular value is repeated by one without a delta.
    """

    U: Tensor
    sigma: Tensor
    Vh: Tensor
    full_rank: bool
    next_sigma: float | None = None


def weight_matrix(weight: Tensor) -> Tensor:
    """View a weight as the matrix (shape[0], rest); a 2-D matrix is returned as it is."""
    return weight.reshape(weight.shape[0], -1)


def svd_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the SVD and the spectrum are computed in: never half precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def svd_driver(device: torch.device) -> str | None:
    """The LAPACK driver the SVD uses on ``device``: QR-based ``gesvd`` on CUDA, torch's default elsewhere."""
    return "gesvd" if device.type == "cuda" else None


def decompose(weight: Tensor, rank: int | None) -> Decomposition:
    """Decompose a weight and keep its top ``rank`` singular triplets.

    The SVD runs in float32 (float64 for float64 weights) on the weight's device;
    on CUDA with the QR-based ``gesvd`` driver, which is accurate on the nearly
    rank-deficient matrices trained weights often are. Signs are fixed so that
    the largest entry of each column of U is positive, which makes the result
    deterministic for a given weight, device and library.

    Args:
        weight: a Linear/Conv weight of any dtype; it is not modified.
        rank: keep the top ``rank`` singular values (capped at min(m, n)); None keeps all.

    Returns:
        The Decomposition.

    Raises:
        SvdtuneError: if the weight contains NaN or infinity.
    """
    matrix = weight_matrix(weight.detach()).to(svd_dtype(weight.dtype))
    if not torch.isfinite(matrix).all():
        raise SvdtuneError("the weight contains NaN or infinity, so it has no SVD; fix or reload the weights first.")
    U, sigma, Vh = torch.linalg.svd(matrix, full_matrices=False, driver=svd_driver(matrix.device))
    k = sigma.numel() if rank is None else min(rank, sigma.numel())
    next_sigma = float(sigma[k]) if k < sigma.numel() else None
    U, sigma, Vh = U[:, :k], sigma[:k], Vh[:k]
    sign = _column_signs(U)
    U, Vh = U * sign, Vh * sign[:, None]
    return Decomposition(
        U=U.to(weight.dtype).contiguous(),
        sigma=sigma.contiguous(),
        Vh=Vh.to(weight.dtype).contiguous(),
        full_rank=k == min(matrix.shape),
        next_sigma=next_sigma,
    )


def _column_signs(U: Tensor) -> Tensor:
    """(k,) of +-1: the sign of the largest-magnitude entry of each column of U."""
    rows = U.abs().argmax(dim=0)
    sign = torch.sign(U.gather(0, rows[None]).squeeze(0))
    return torch.where(sign == 0, torch.ones_like(sign), sign)


def full_svd_seconds(m: int, n: int) -> float:
    """The expected seconds of a full SVD of an (m, n) float32 matrix on the CPU of this process.

    Cost model: m * n * min(m, n) multiply-adds (LAPACK's divide and conquer), at the rate of
    one timed SVD of a 1024 x 512 matrix (measured once per process, about 0.1 s).
    """
    if not _seconds_per_unit:
        a, b = _CALIBRATION
        matrix = torch.randn(a, b, generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        torch.linalg.svd(matrix, full_matrices=False)
        _seconds_per_unit.append((time.perf_counter() - start) / (a * b * min(a, b)))
    return _seconds_per_unit[0] * m * n * min(m, n)


def warn_if_slow_svd(name: str, shape: tuple[int, int], rank: int | None, device: torch.device) -> None:
    """Warn before a full-rank SVD of a matrix over `SLOW_SVD_ENTRIES` entries (e.g. a large vocabulary's
    embedding), with its expected time on the CPU, and point to ``rank=k``."""
    m, n = shape
    if m * n <= SLOW_SVD_ENTRIES or (rank is not None and rank < min(m, n)):
        return
    where = "" if device.type == "cpu" else f" on the CPU (this one runs on {device.type})"
    warnings.warn(
        f"layer {name!r}: a full SVD of its {m} x {n} matrix ({m * n:.2g} entries) takes about "
        f"{full_svd_seconds(m, n):.0f} s{where} and stores {min(m, n)} singular vectors per side; pass rank=k "
        "(e.g. rank=64) to tune only the top k singular values, or exclude the layer.",
        RuntimeWarning, stacklevel=4,
    )
