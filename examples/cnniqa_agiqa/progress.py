"""Progress bars: tqdm on a terminal, else plain lines.

tqdm redraws its bar with carriage returns, which floods a log file, so it is
used only when stderr is a terminal (and tqdm is installed). Otherwise a plain
line is printed at a tenth of the work at most every `PLAIN_INTERVAL` seconds,
and at the end. Both write to stderr, so the results table on stdout stays
clean; `enabled` False (from --quiet, or on ranks other than 0) silences them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["progress", "say", "PLAIN_INTERVAL"]

PLAIN_INTERVAL = 10.0  # seconds: the least time between two plain progress lines (the last line always shows)

T = TypeVar("T")


def say(message: str, enabled: bool = True) -> None:
    """Print a status line to stderr unless silenced."""
    if enabled:
        print(message, file=sys.stderr, flush=True)


def _plain(items: Iterable[T], total: int, desc: str, interval: float) -> Iterator[T]:
    """Plain lines: at a tenth of the work if `interval` seconds passed since the last line, and at the end."""
    start = last = time.perf_counter()
    mark = 0
    for done, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        tenth = total and done * 10 // total > mark
        if tenth:
            mark = done * 10 // total
        if done == total or (tenth and now - last >= interval):
            last = now
            print(f"{desc}: {done}/{total} ({now - start:.1f} s)", file=sys.stderr, flush=True)


def progress(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True,
             interval: float = PLAIN_INTERVAL) -> Iterator[T]:
    """Wrap an iterable in a progress bar (tqdm on a terminal), or plain lines when stderr is not a terminal.

    Args:
        items: what to iterate over.
        desc: label of the bar.
        total: number of items (len(items) if omitted and available).
        enabled: False returns the items unwrapped.
        interval: plain lines only: the least seconds between two lines (the last one always shows).

    Returns:
        An iterator over the same items.
    """
    if not enabled:
        return iter(items)
    if total is None:
        total = len(items) if hasattr(items, "__len__") else 0  # type: ignore[arg-type]
    if not sys.stderr.isatty():
        return _plain(items, total, desc, interval)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _plain(items, total, desc, interval)
    return iter(tqdm(items, desc=desc, total=total or None, leave=False, file=sys.stderr, dynamic_ncols=True))
