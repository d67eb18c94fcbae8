"""How long the whole run will take: from its first measured epoch, then from the runs done so far.

After the first epoch of the first trained variant on split 1 the run prints
an estimate of its total time (every trained variant costing what that one
did); after every (split, variant) run it prints the time left, from the mean
time each variant has taken so far.
"""

from __future__ import annotations

import time

__all__ = ["RunClock", "duration"]


def duration(seconds: float) -> str:
    """'45 s', '12 min' or '3.4 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class RunClock:
    """Times the (split, variant) runs of an experiment and extrapolates.

    Args:
        jobs: every (split, variant) pair of the run, in order.
        trained: the variants that train (the others only evaluate).
        epochs: epochs per trained run.
    """

    def __init__(self, jobs: list[tuple[int, str]], trained: set[str], epochs: int) -> None:
        self.jobs, self.trained, self.epochs = list(jobs), trained, epochs
        self.start = time.perf_counter()
        self.seconds: dict[str, list[float]] = {}  # variant -> seconds of each finished run
        self.announced = False

    def first_epoch(self, variant: str, val_seconds: float, epoch_seconds: float) -> str | None:
        """The whole-run estimate, once: from the validation pass before training and the first epoch.

        Args:
            variant: the variant that measured it.
            val_seconds: the validation pass before training (epoch 0).
            epoch_seconds: the first epoch, training and validation.

        Returns:
            The line to print, or None after the first call.
        """
        if self.announced:
            return None
        self.announced = True
        trained = val_seconds * 2 + self.epochs * epoch_seconds  # epoch 0, epochs, and a test pass ~ a val pass
        untrained = val_seconds * 2
        total = sum(trained if v in self.trained else untrained for _, v in self.jobs)
        splits = len({s for s, _ in self.jobs})
        count = len({v for _, v in self.jobs if v in self.trained})
        return (f"estimate from the first epoch of {variant} ({epoch_seconds:.1f} s, validation {val_seconds:.1f} s): "
                f"the whole run takes about {duration(total)} ({splits} split(s) x {count} trained variant(s) x "
                f"{self.epochs} epochs, if every variant costs what {variant} did)")

    def finished(self, variant: str, seconds: float) -> str:
        """Record one finished run; returns 'about X left' for the runs still to come."""
        self.seconds.setdefault(variant, []).append(seconds)
        done = sum(len(v) for v in self.seconds.values())
        every = [s for runs in self.seconds.values() for s in runs]
        fallback = max(every)
        left = sum(self._mean(v, fallback) for _, v in self.jobs[done:])
        return f"{duration(time.perf_counter() - self.start)} so far, about {duration(left)} left"

    def _mean(self, variant: str, fallback: float) -> float:
        runs = self.seconds.get(variant)
        return sum(runs) / len(runs) if runs else fallback
