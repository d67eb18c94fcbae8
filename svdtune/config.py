"""Per-layer spectral settings: how a layer's singular values are shifted."""

from __future__ import annotations

import math
from dataclasses import dataclass

from svdtune.errors import SvdtuneError

MODES = ("shift", "scale")


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
        if self.mode not in MODES:
            raise SvdtuneError(f"mode={self.mode!r} is not supported; use one of {MODES}.")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise SvdtuneError(f"rank={self.rank!r} must be a positive int, or None to tune every singular value.")
        check_scale(self.scale)


def check_scale(scale: object) -> None:
    """Raise SvdtuneError unless ``scale`` is a finite number (bools refused)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise SvdtuneError(f"scale={scale!r} must be a finite number (1.0 applies the deltas as trained).")
