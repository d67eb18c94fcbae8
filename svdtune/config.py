"""Per-layer spectral settings: how a layer's singular values are shifted."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy
import torch

from svdtune.errors import SvdtuneError

MODES = ("shift", "scale")
_PLAIN_NUMBERS = frozenset({int, float})  # the number types JSON gives (a bool is neither)


@dataclass(frozen=True)
class SpectralConfig:
    """How one layer is adapted. Frozen: change settings with `svdtune.set_scale`.

    Attributes:
        mode: "shift": sigma' = relu(sigma + s * delta) (SVDiff);
            "scale": sigma' = sigma * (1 + s * delta).
        rank: number of top singular values that get a delta; None for all of them.
        scale: s above, the strength of the deltas at run time (1.0 = as trained).
    """

    mode: str = "shift"
    rank: int | None = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise SvdtuneError(f"mode={self.mode!r:.60} is not supported; use one of {MODES}.")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise SvdtuneError(f"rank={self.rank!r} must be a positive int, or None to tune every singular value.")
        object.__setattr__(self, "scale", as_scale(self.scale))  # always a Python float


def finite_number(value: object) -> float | None:
    """``value`` as a float if it is a finite real number, else None.

    Accepted: int, float, NumPy scalars, and one-element NumPy arrays or tensors of an
    integer or floating dtype. Refused: bools, complex numbers, strings, None, NaN, infinity,
    integers beyond the float range (e.g. 10**400), meta tensors.
    """
    kind = type(value)  # fast paths for what JSON gives: exactly float or int (a bool is neither)
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is int:
        try:
            return float(value)  # finite unless it overflows
        except OverflowError:
            return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex() or value.is_meta:
            return None  # a meta tensor has no value to read
        value = value.item()
    elif isinstance(value, numpy.ndarray) and value.size == 1 and value.dtype.kind in "iuf":
        value = value.item()
    if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)  # an int beyond float range (10**400) overflows: not a finite number
    except (OverflowError, ValueError, TypeError):
        return None
    return number if math.isfinite(number) else None


def all_finite_numbers(values: list | tuple) -> bool:
    """True if every item of ``values`` is a finite real number (`finite_number` is not None for each).

    Linear, and fast for what JSON gives (plain floats and ints): the per-item work runs in C.
    """
    if set(map(type, values)) <= _PLAIN_NUMBERS:
        try:
            return all(map(math.isfinite, values))
        except OverflowError:  # an int beyond the float range
            return False
    return all(finite_number(value) is not None for value in values)


def as_scale(scale: object) -> float:
    """``scale`` as a float (see `finite_number`).

    Raises:
        SvdtuneError: if it is not a finite real number.
    """
    value = finite_number(scale)
    if value is None:
        raise SvdtuneError(f"scale={scale!r} must be a finite number (1.0 applies the deltas as trained).")
    return value
