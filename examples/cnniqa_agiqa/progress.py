"""Progress bars: tqdm when installed, else a plain line every ~10 %.

Both write to stderr, so the results table on stdout stays clean; `enabled`
False (from --quiet, or on ranks other than 0) silences them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["progress", "say"]

T = TypeVar("T")


def say(message: str, enabled: bool = True) -> None:
    """Print a status line to stderr unless silenced."""
    if enabled:
        print(message, file=sys.stderr, flush=True)


def _plain(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """Fallback bar: one line at every tenth of the work and at the end."""
    start, mark = time.perf_counter(), 0
    for done, item in enumerate(items, 1):
        yield item
        if total and done * 10 // total > mark or done == total:
            mark = done * 10 // max(total, 1)
            elapsed = time.perf_counter() - start
            print(f"{desc}: {done}/{total} ({elapsed:.1f} s)", file=sys.stderr, flush=True)


def progress(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Wrap an iterable in a progress bar.

    Args:
        items: what to iterate over.
        desc: label of the bar.
        total: number of items (len(items) if omitted and available).
        enabled: False returns the items unwrapped.

    Returns:
        An iterator over the same items.
    """
    if not enabled:
        return iter(items)
    if total is None:
        total = len(items) if hasattr(items, "__len__") else 0  # type: ignore[arg-type]
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _plain(items, total, desc)
    return iter(tqdm(items, desc=desc, total=total or None, leave=False, file=sys.stderr, dynamic_ncols=True))
