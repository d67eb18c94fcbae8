"""What truncating a LoRA export to rank r costs, exactly and without an SVD.

A layer's update dW = U diag(shift) Vh is its own SVD (U, Vh orthonormal), so keeping the r
largest |shift| is the best rank-r approximation (Eckart-Young), and what it drops is known:
in spectral norm the largest dropped |shift|, in Frobenius norm the root of the sum of the
dropped squares. `svdtune.lora` reports these relative to the update and to the weight W'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from svdtune.errors import SvdtuneError


@dataclass(frozen=True)
class LayerError:
    """What truncating one layer's update (or all of them) to the kept rank costs, relative errors.

    Attributes:
        tuned: the number of tuned singular values (the exact rank of the update, at most).
        rank: the LoRA rank written (a grouped conv of g groups writes g times the kept values).
        update_spectral, update_frobenius: ||dW - dW_r|| / ||dW||, dW = W' - W.
        weight_spectral, weight_frobenius: ||W' - W'_r|| / ||W'||, W'_r = W + dW_r.
    """

    tuned: int
    rank: int
    update_spectral: float
    update_frobenius: float
    weight_spectral: float
    weight_frobenius: float


def kept(shift: Tensor, rank: int | None) -> Tensor:
    """The indices of the ``rank`` largest |shift| (all of them for None), in their original order."""
    if rank is None or rank >= shift.numel():
        return torch.arange(shift.numel())
    return torch.sort(torch.topk(shift.abs(), rank, sorted=False).indices).values


def norms_of(shift: Tensor, sigma: Tensor, keep: Tensor, weight_frobenius2: float,
             untuned_top: float) -> tuple[float, float, float, float, float, float]:
    """(dropped spectral, dropped Frobenius^2, ||dW||_2, ||dW||_F^2, ||W'||_2, ||W'||_F^2), in float64, for
    dW = U diag(shift) Vh with only ``keep`` kept; ``sigma`` the tuned singular values of W, ``untuned_top``
    the largest untuned one (0.0 if none).

    The singular values of W' are |sigma + shift| and the untuned ones of W, so its norms need no SVD:
    ||W'||_F^2 = ||W||_F^2 + sum shift * (2 sigma + shift), since <W, u_i v_i^T> = sigma_i.
    """
    shift, sigma = shift.double().cpu(), sigma.double().cpu()
    dropped = torch.ones(shift.numel(), dtype=torch.bool)
    dropped[keep.cpu()] = False
    lost = shift[dropped].abs()
    top = float((sigma + shift).abs().max()) if shift.numel() else 0.0
    weight_fro2 = weight_frobenius2 + float((shift * (2 * sigma + shift)).sum())
    return (float(lost.max()) if lost.numel() else 0.0, float(lost.square().sum()), float(shift.abs().max()),
            float(shift.square().sum()), max(top, untuned_top), max(weight_fro2, 0.0))


def _ratio(part: float, whole: float) -> float:
    return part / whole if part else 0.0


def layer_error(norms: tuple[float, ...], tuned: int, rank: int) -> LayerError:
    lost, lost2, spectral, fro2, weight, weight2 = norms
    return LayerError(tuned, rank, _ratio(lost, spectral), _ratio(math.sqrt(lost2), math.sqrt(fro2)),
                      _ratio(lost, weight), _ratio(math.sqrt(lost2), math.sqrt(weight2)))


def overall(norms: list[tuple[float, ...]], errors: list[LayerError]) -> LayerError:
    """All layers as one block-diagonal operator: spectral norms are maxima, squared Frobenius norms add."""
    total = tuple((max if i % 2 == 0 else sum)(column) for i, column in enumerate(zip(*norms)))
    return layer_error(total, sum(e.tuned for e in errors), max(e.rank for e in errors))


def check_max_rank(errors: dict[str, LayerError], max_rank: int | None) -> None:
    for name, error in errors.items():
        if max_rank is not None and error.rank > max_rank:
            raise SvdtuneError(f"layer {name!r} would get LoRA rank {error.rank}, above max_rank={max_rank}; pass a "
                               "smaller rank= (it keeps the largest shifts; the returned table shows the error).")
