"""A progress bar over layers whose remaining time is weighted by each layer's cost.

Shown through tqdm (optional: without it nothing is shown) on standard error, only when
that is a terminal, only once the work has taken more than ``DELAY`` seconds, and never
with ``enabled=False``. The bar counts estimated multiply-adds, so its remaining time is
the remaining cost at the rate measured so far; the text says which layer of how many.
"""

from __future__ import annotations

import sys
from types import TracebackType

DELAY = 1.0  # seconds before the bar appears: a fast apply prints nothing
REFRESH = 0.1  # seconds between redraws at most


class LayerProgress:
    """``with LayerProgress(costs, enabled) as bar: ...; bar.advance(cost)`` once per layer.

    Args:
        costs: the estimated cost of each layer, in order (any positive unit).
        enabled: False never shows anything.
        description: the bar's label.
    """

    def __init__(self, costs: list[float], enabled: bool = True, description: str = "svdtune.apply") -> None:
        self.count, self.done, self.description = len(costs), 0, description
        self._bar = _tqdm(sum(costs), self._label()) if enabled and _terminal() else None

    def advance(self, cost: float) -> None:
        """One more layer done, which cost ``cost``."""
        self.done += 1
        if self._bar is not None:
            self._bar.set_description_str(self._label(), refresh=False)
            self._bar.update(cost)

    def _label(self) -> str:
        return f"{self.description} layer {self.done}/{self.count}"

    def __enter__(self) -> LayerProgress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.close()


def _terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def _tqdm(total: float, description: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=description, delay=DELAY, mininterval=REFRESH, miniters=1, leave=False, file=sys.stderr,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
