"""The frozen SVD of a layer weight: W (as a matrix) = U diag(sigma) Vh, truncated to a rank.

A weight is viewed as the matrix ``weight.reshape(weight.shape[0], -1)``:
- ``nn.Linear``: (out_features, in_features), the weight itself;
- ``nn.ConvNd``: (out_channels, in_channels/groups * prod(kernel_size));
- ``nn.ConvTransposeNd``: (in_channels, out_channels/groups * prod(kernel_size)),
  because PyTorch stores transposed-conv weights input-channels first.
The reshape is a view, so the delta weight reshapes back without a permutation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from svdtune.errors import SvdtuneError

SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


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
    """View a Linear/Conv weight as the matrix that is decomposed: (shape[0], rest)."""
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
