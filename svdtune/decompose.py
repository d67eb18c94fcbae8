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
from svdtune.randomized import RandomizedSVD, randomized_svd

SVD_CHOICES = ("auto", "exact", "randomized")
RANDOMIZED_FRACTION = 4  # "auto" is randomized when rank + oversample <= min(m, n) / 4 ...
RANDOMIZED_MIN_SIZE = 512  # ... and min(m, n) >= 512: below, the exact SVD takes milliseconds

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
        svd: the `RandomizedSVD` parameters that computed it, None for the exact SVD.
    """

    U: Tensor
    sigma: Tensor
    Vh: Tensor
    full_rank: bool
    next_sigma: float | None = None
    svd: RandomizedSVD | None = None


def weight_matrix(weight: Tensor) -> Tensor:
    """View a weight as the matrix (shape[0], rest); a 2-D matrix is returned as it is."""
    return weight.reshape(weight.shape[0], -1)


def svd_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the SVD and the spectrum are computed in: never half precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def svd_driver(device: torch.device) -> str | None:
    """The LAPACK driver the SVD uses on ``device``: QR-based ``gesvd`` on CUDA, torch's default elsewhere."""
    return "gesvd" if device.type == "cuda" else None


def check_svd_choice(svd: object) -> None:
    """Refuse an ``svd`` argument that is none of `SVD_CHOICES`, None or a `RandomizedSVD`."""
    if not (svd is None or isinstance(svd, RandomizedSVD) or (isinstance(svd, str) and svd in SVD_CHOICES)):
        raise SvdtuneError(f"svd={svd!r:.60} is not an SVD method; use one of {SVD_CHOICES} or a svdtune.RandomizedSVD.")


def choose_svd(shape: tuple[int, int], rank: int | None, svd: str | RandomizedSVD | None = "auto") -> RandomizedSVD | None:
    """The algorithm that decomposes a matrix of ``shape`` at ``rank``: a `RandomizedSVD`, or None (exact).

    Rule for ``"auto"``: the randomized SVD with default parameters when ``rank`` is set,
    rank + oversample <= min(m, n) / 4 and min(m, n) >= 512; else the exact SVD.

    Args:
        shape: (m, n) of the weight matrix.
        rank: the number of singular triplets kept, None for all.
        svd: "auto", "exact" (always torch.linalg.svd), "randomized" (default `RandomizedSVD`
            parameters wherever they fit), a `RandomizedSVD` (those parameters), or None (exact).

    Raises:
        SvdtuneError: an unknown ``svd``, or a randomized SVD asked for where it cannot run
            (no rank, or rank + oversample > min(m, n)).
    """
    check_svd_choice(svd)
    if svd is None or svd == "exact":
        return None
    params = svd if isinstance(svd, RandomizedSVD) else RandomizedSVD()  # "auto" or "randomized"
    size = min(shape)
    width = None if rank is None else rank + params.oversample
    if svd == "auto":
        fits = width is not None and width * RANDOMIZED_FRACTION <= size and size >= RANDOMIZED_MIN_SIZE
        return params if fits else None
    if width is None or width > size:
        raise SvdtuneError(f"svd={svd!r} needs a rank with rank + oversample ({params.oversample}) <= min(m, n) = {size}, "
                           f"got rank={rank}; pass a smaller rank, or svd='auto'/'exact'.")
    return params


def decompose(weight: Tensor, rank: int | None, svd: str | RandomizedSVD | None = "auto") -> Decomposition:
    """Decompose a weight and keep its top ``rank`` singular triplets.

    The SVD runs in float32 (float64 for float64 weights) on the weight's device;
    on CUDA with the QR-based ``gesvd`` driver, which is accurate on the nearly
    rank-deficient matrices trained weights often are. Which SVD runs is `choose_svd`'s
    rule: the exact one, or for a rank well below min(m, n) the randomized one (see
    `svdtune.randomized`), which estimates the top triplets. Signs are fixed so that
    the largest entry of each column of U is positive, which makes the result
    deterministic for a given weight, method, device and library.

    Args:
        weight: a Linear/Conv weight of any dtype; it is not modified.
        rank: keep the top ``rank`` singular values (capped at min(m, n)); None keeps all.
        svd: the method, as for `choose_svd` ("auto" by default).

    Returns:
        The Decomposition; its ``svd`` says which method computed it.

    Raises:
        SvdtuneError: if the weight contains NaN or infinity, or as `choose_svd`.
    """
    matrix = weight_matrix(weight.detach()).to(svd_dtype(weight.dtype))
    if not torch.isfinite(matrix).all():
        raise SvdtuneError("the weight contains NaN or infinity, so it has no SVD; fix or reload the weights first.")
    k = min(matrix.shape) if rank is None else min(rank, min(matrix.shape))
    params = choose_svd(tuple(matrix.shape), None if rank is None else k, svd)
    if params is None:
        U, sigma, Vh = torch.linalg.svd(matrix, full_matrices=False, driver=svd_driver(matrix.device))
    else:
        U, sigma, Vh = randomized_svd(matrix, k, params, svd_driver(matrix.device))
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
        svd=params,
    )


def decomposition_cost(shape: tuple[int, int], rank: int | None, svd: RandomizedSVD | None) -> float:
    """Estimated multiply-adds of decomposing a matrix (m, n) by the resolved method ``svd``
    (None: the exact SVD, ~ m n min(m, n); randomized: 2 (iterations + 1) products with (n, l))."""
    m, n = shape
    if svd is None:
        return float(m * n * min(m, n))
    return float(m * n * (rank + svd.oversample) * 2 * (svd.iterations + 1))


def numerically_zero(factors: Decomposition) -> int:
    """How many of the kept singular values are numerically zero: at most max(m, n) * eps * sigma_max
    (eps of the SVD's dtype), the accuracy of the SVD itself; all of them for an all-zero weight."""
    sigma = factors.sigma
    if sigma.numel() == 0:
        return 0
    tolerance = max(factors.U.shape[0], factors.Vh.shape[1]) * torch.finfo(sigma.dtype).eps * float(sigma[0])
    return int((sigma <= tolerance).sum())


def warn_if_degenerate(factors: dict[str, Decomposition], mode: str) -> None:
    """Warn once, naming the layers whose tuned singular values include numerically zero ones
    (all-zero weights, rank-deficient weights): their singular vectors there are arbitrary."""
    zeros = {name: (numerically_zero(f), f.sigma.numel()) for name, f in factors.items()}
    zeros = {name: counts for name, counts in zeros.items() if counts[0]}
    if not zeros:
        return
    shown = [f"{name!r} ({'all-zero weight' if float(factors[name].sigma[0]) == 0 else f'{z} of {k} zero'})"
             for name, (z, k) in list(zeros.items())[:5]]
    more = f" and {len(zeros) - 5} more" if len(zeros) > 5 else ""
    effect = ("a zero singular value never moves in mode 'scale'" if mode == "scale" else
              "a zero singular value can only grow along an arbitrary singular direction in mode 'shift'")
    warnings.warn(
        f"layers {', '.join(shown)}{more} have numerically zero singular values (at most max(m, n) * eps * sigma_max) "
        f"among the tuned ones: their singular vectors there are arbitrary, and {effect}; train such layers fully "
        f"with apply(..., trainable=[{next(iter(zeros))!r}]) and leave them out of targets.",
        RuntimeWarning, stacklevel=3,
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
