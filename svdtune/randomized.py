"""The randomized truncated SVD: the top k singular triplets without the full decomposition.

Halko, Martinsson and Tropp (2011), algorithm 4.4 with oversampling: for a matrix A (m, n),
1. draw a Gaussian test matrix Omega (n, l), l = k + oversample, from a generator seeded
   with ``seed`` on the CPU (so every device starts from the same one);
2. Q = orth(A Omega), then ``iterations`` power iterations Q = orth(A orth(A^T Q)),
   re-orthonormalised by QR after every product (without it the columns collapse onto the
   top singular vector in float32);
3. the exact SVD of the small B = Q^T A (l, n) = U_B diag(s) Vh gives U = Q U_B.
The top k of the l triplets are kept; s[k] estimates the first singular value left out.

Each power iteration multiplies the gap between kept and left-out singular values:
the error of sigma_j shrinks like (sigma_{l+1} / sigma_j) ** (2 * iterations + 1).
Cost: 2 * (iterations + 1) products of A with an (n, l) or (m, l) matrix plus QRs of
(m, l), against O(m n min(m, n)) for the full SVD. The result is deterministic for a given
matrix, device and library; it is *not* the exact SVD, but the frozen residual W - U diag(sigma) Vh
is never formed, so zero deltas still give W bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from svdtune.errors import SvdtuneError

METHOD = "randomized"  # the "method" of a delta record's "svd" key


@dataclass(frozen=True)
class RandomizedSVD:
    """The parameters of the randomized SVD; what a delta file's ``"svd"`` record holds.

    Attributes:
        oversample: extra columns drawn beyond the rank k (l = k + oversample), at least 1
            (the first left-out singular value is estimated too).
        iterations: power iterations (each costs two products with the weight).
        seed: the seed of the CPU generator that draws the test matrix.
    """

    oversample: int = 16
    iterations: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("oversample", 1), ("iterations", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**31:
                raise SvdtuneError(f"randomized SVD {name}={value!r} must be an int from {low} to 2**31 - 1.")

    def record(self) -> dict[str, object]:
        """The delta file's ``"svd"`` value: ``{"method": "randomized", "oversample": ..., ...}``."""
        return {"method": METHOD, "oversample": self.oversample, "iterations": self.iterations, "seed": self.seed}

    def describe(self) -> str:
        """A short stable text of the parameters, for the cache key: ``randomized-p16-q4-s0``."""
        return f"{METHOD}-p{self.oversample}-q{self.iterations}-s{self.seed}"


def from_record(value: object) -> RandomizedSVD:
    """The `RandomizedSVD` of a delta record's ``"svd"`` value.

    Raises:
        SvdtuneError: it is not ``{"method": "randomized", "oversample": int, "iterations": int, "seed": int}``.
    """
    keys = {"method", "oversample", "iterations", "seed"}
    if not isinstance(value, dict) or set(value) != keys or value["method"] != METHOD:
        raise SvdtuneError(f"has an svd record {value!r} that this svdtune does not know "
                           f"(expected the keys {sorted(keys)} with method {METHOD!r})")
    return RandomizedSVD(value["oversample"], value["iterations"], value["seed"])


def randomized_svd(
    matrix: Tensor, k: int, params: RandomizedSVD, driver: str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The top l = k + oversample singular triplets of ``matrix`` (m, n), estimated.

    Args:
        matrix: float32 or float64, on any device; not modified.
        k: the rank wanted; k + oversample must not exceed min(m, n).
        params: oversampling, iterations and seed.
        driver: the LAPACK driver of the small SVD (see `svdtune.decompose.svd_driver`).

    Returns:
        (U (m, l), sigma (l,) descending, Vh (l, n)) in the matrix's dtype and device.
    """
    m, n = matrix.shape
    width = k + params.oversample
    if width > min(m, n):
        raise SvdtuneError(f"randomized SVD of rank {k} with oversample {params.oversample} needs "
                           f"min(m, n) >= {width}, but the matrix is {m}x{n}; use the exact SVD.")
    generator = torch.Generator(device="cpu").manual_seed(params.seed)
    omega = torch.randn(n, width, generator=generator, dtype=matrix.dtype).to(matrix.device)  # (n, l)
    basis = _orthonormal(matrix @ omega)  # (m, l)
    for _ in range(params.iterations):
        basis = _orthonormal(matrix @ _orthonormal(matrix.T @ basis))  # (n, l) then (m, l)
    small = basis.T @ matrix  # (l, n)
    U_small, sigma, Vh = torch.linalg.svd(small, full_matrices=False, driver=driver)
    return basis @ U_small, sigma, Vh


def _orthonormal(columns: Tensor) -> Tensor:
    """An orthonormal basis of the column span (reduced QR's Q), same shape."""
    return torch.linalg.qr(columns, mode="reduced").Q
