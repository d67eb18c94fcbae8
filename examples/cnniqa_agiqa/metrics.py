"""Correlation metrics of image-quality assessment, in numpy only.

SRCC (Spearman), PLCC (Pearson, raw and after the usual 4-parameter
logistic fit of predictions to scores) and KRCC (Kendall tau-b). scipy is
not a dependency of the example; the tests check these against scipy.stats.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["srcc", "plcc", "krcc", "plcc_logistic", "fit_logistic", "logistic4", "all_metrics"]


def _as_pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and flatten a (prediction, target) pair to float64 vectors."""
    x = np.asarray(pred, dtype=np.float64).reshape(-1)
    y = np.asarray(target, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"predictions ({x.size}) and targets ({y.size}) differ in length; pass one score per image")
    if x.size < 2:
        raise ValueError("need at least 2 scored images to compute a correlation")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("predictions or targets contain NaN/inf; check the model output and the score column")
    return x, y


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0.0 when either vector is constant."""
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc * xc).sum() * (yc * yc).sum())
    return float((xc * yc).sum() / denom) if denom > 0 else 0.0


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy's 'average').

    Args:
        values: 1-D array.

    Returns:
        float64 array of the same length.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    # Start index of each run of equal values, and the run each element is in.
    new_run = np.concatenate(([True], sorted_v[1:] != sorted_v[:-1]))
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.concatenate((starts[1:], [v.size]))
    average = (starts + ends - 1) / 2.0 + 1.0  # mean of ranks start+1..end
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = average[run_id]
    return ranks


def srcc(pred: np.ndarray, target: np.ndarray) -> float:
    """Spearman rank correlation (ties averaged).

    Args:
        pred: predicted scores, any shape with n elements.
        target: subjective scores (MOS), n elements.

    Returns:
        The coefficient in [-1, 1].

    Raises:
        ValueError: lengths differ, fewer than 2 items, or non-finite values.
    """
    x, y = _as_pair(pred, target)
    return _pearson(rankdata(x), rankdata(y))


def plcc(pred: np.ndarray, target: np.ndarray) -> float:
    """Pearson linear correlation of raw predictions and targets.

    Args:
        pred: predicted scores, n elements.
        target: subjective scores, n elements.

    Returns:
        The coefficient in [-1, 1] (0.0 if either side is constant).

    Raises:
        ValueError: as for `srcc`.
    """
    x, y = _as_pair(pred, target)
    return _pearson(x, y)


def krcc(pred: np.ndarray, target: np.ndarray, chunk: int = 512) -> float:
    """Kendall rank correlation tau-b (scipy.stats.kendalltau's default).

    O(n^2) pair counting, done `chunk` rows at a time to bound memory.

    Args:
        pred: predicted scores, n elements.
        target: subjective scores, n elements.
        chunk: rows of the pair matrix handled at once.

    Returns:
        tau-b in [-1, 1] (0.0 if either side is constant).

    Raises:
        ValueError: as for `srcc`.
    """
    x, y = _as_pair(pred, target)
    concord = 0.0  # sum over pairs i<j of sign(dx) * sign(dy)
    pairs_x = pairs_y = 0.0  # pairs not tied in x, in y
    for start in range(0, x.size, chunk):
        stop = min(start + chunk, x.size)
        dx = np.sign(x[start:stop, None] - x[None, :])  # (c, n)
        dy = np.sign(y[start:stop, None] - y[None, :])
        concord += float((dx * dy).sum())
        pairs_x += float(np.count_nonzero(dx))
        pairs_y += float(np.count_nonzero(dy))
    # Every unordered pair was counted twice (i, j) and (j, i); the factor cancels.
    denom = np.sqrt(pairs_x * pairs_y)
    return float(concord / denom) if denom > 0 else 0.0


def logistic4(x: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The VQEG 4-parameter logistic: (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2."""
    z = np.clip(-(x - b[2]) / (abs(b[3]) + 1e-12), -60.0, 60.0)
    return (b[0] - b[1]) / (1.0 + np.exp(z)) + b[1]


def _jacobian(f: Callable[[np.ndarray], np.ndarray], b: np.ndarray) -> np.ndarray:
    """Forward-difference Jacobian of f at b: (n, 4)."""
    f0 = f(b)
    cols = []
    for k in range(b.size):
        step = 1e-6 * max(1.0, abs(b[k]))
        bk = b.copy()
        bk[k] += step
        cols.append((f(bk) - f0) / step)
    return np.stack(cols, axis=1)


def fit_logistic(pred: np.ndarray, target: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Least-squares fit of `logistic4` mapping predictions to targets.

    Levenberg-Marquardt from the customary start: b1 = max target,
    b2 = min target, b3 = mean prediction, b4 = std of predictions / 4.

    Args:
        pred: predicted scores, n elements.
        target: subjective scores, n elements.
        iterations: maximum damped Gauss-Newton steps.

    Returns:
        The 4 parameters b1..b4 as a float64 array.

    Raises:
        ValueError: as for `srcc`.
    """
    x, y = _as_pair(pred, target)
    b = np.array([y.max(), y.min(), x.mean(), max(x.std(), 1e-6) / 4.0])
    residual = lambda p: logistic4(x, p) - y  # noqa: E731 - local closure
    cost, damping = float((residual(b) ** 2).sum()), 1e-3
    for _ in range(iterations):
        jac = _jacobian(lambda p: logistic4(x, p), b)  # (n, 4)
        hess = jac.T @ jac
        grad = jac.T @ residual(b)
        step = np.linalg.solve(hess + damping * np.diag(np.diag(hess) + 1e-12), -grad)
        trial = b + step
        trial_cost = float((residual(trial) ** 2).sum())
        if trial_cost < cost:
            converged = cost - trial_cost < 1e-12 * max(cost, 1e-12)
            b, cost, damping = trial, trial_cost, damping / 3.0
            if converged:
                break
        else:
            damping *= 4.0
            if damping > 1e12:
                break
    return b


def plcc_logistic(pred: np.ndarray, target: np.ndarray) -> float:
    """PLCC after mapping predictions through the fitted 4-parameter logistic.

    Args:
        pred: predicted scores, n elements.
        target: subjective scores, n elements.

    Returns:
        Pearson correlation of logistic4(pred) with target.

    Raises:
        ValueError: as for `srcc`.
    """
    x, y = _as_pair(pred, target)
    return _pearson(logistic4(x, fit_logistic(x, y)), y)


def all_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """SRCC, PLCC, PLCC after the logistic fit, KRCC, as one dict.

    Args:
        pred: predicted scores, n elements.
        target: subjective scores, n elements.

    Returns:
        {"srcc", "plcc", "plcc_logistic", "krcc"} -> float.
    """
    return {
        "srcc": srcc(pred, target),
        "plcc": plcc(pred, target),
        "plcc_logistic": plcc_logistic(pred, target),
        "krcc": krcc(pred, target),
    }
