"""The example's IQA metrics against scipy.stats / scipy.optimize."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.cnniqa_agiqa import metrics

scipy_stats = pytest.importorskip("scipy.stats")
scipy_optimize = pytest.importorskip("scipy.optimize")

# Few distinct values, so ties are common in both vectors.
_pairs = st.integers(min_value=3, max_value=60).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(-5, 5).map(float), min_size=n, max_size=n),
        st.lists(st.floats(-3, 3, allow_nan=False).map(lambda v: round(v, 1)), min_size=n, max_size=n),
    )
)


def _not_constant(x: list[float], y: list[float]) -> bool:
    return len(set(x)) > 1 and len(set(y)) > 1


@settings(max_examples=80, deadline=None)
@given(_pairs)
def test_rank_correlations_match_scipy_with_ties(pair):
    x, y = (np.array(v) for v in pair)
    if not _not_constant(list(x), list(y)):
        return
    assert metrics.srcc(x, y) == pytest.approx(scipy_stats.spearmanr(x, y)[0], abs=1e-12)
    assert metrics.krcc(x, y) == pytest.approx(scipy_stats.kendalltau(x, y)[0], abs=1e-12)
    assert metrics.plcc(x, y) == pytest.approx(scipy_stats.pearsonr(x, y)[0], abs=1e-12)


def test_rankdata_matches_scipy_average():
    values = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0])
    np.testing.assert_allclose(metrics.rankdata(values), scipy_stats.rankdata(values))


def test_krcc_chunking_does_not_change_result():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=1100), rng.normal(size=1100)
    assert metrics.krcc(x, y, chunk=97) == pytest.approx(scipy_stats.kendalltau(x, y)[0], abs=1e-12)


def _scipy_plcc_logistic(x: np.ndarray, y: np.ndarray) -> float:
    def f(v, b1, b2, b3, b4):
        return (b1 - b2) / (1 + np.exp(-(v - b3) / abs(b4))) + b2

    p0 = [y.max(), y.min(), x.mean(), x.std() / 4]
    params, _ = scipy_optimize.curve_fit(f, x, y, p0=p0, maxfev=20000)
    return scipy_stats.pearsonr(f(x, *params), y)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plcc_after_logistic_fit_matches_scipy_curve_fit(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=300)
    y = 4.0 / (1 + np.exp(-2.5 * (x - 0.3))) + 0.5 + rng.normal(scale=0.25, size=300)
    ours = metrics.plcc_logistic(x, y)
    assert ours == pytest.approx(_scipy_plcc_logistic(x, y), abs=1e-6)
    assert ours > metrics.plcc(x, y)  # the fit straightens a clearly nonlinear relation


def test_all_metrics_keys_and_perfect_ranking():
    x = np.linspace(0, 1, 20)
    result = metrics.all_metrics(x, x**3)
    assert set(result) == {"srcc", "plcc", "plcc_logistic", "krcc"}
    assert result["srcc"] == pytest.approx(1.0) and result["krcc"] == pytest.approx(1.0)
    assert result["plcc"] < 1.0


def test_constant_predictions_give_zero_not_nan():
    assert metrics.srcc(np.ones(5), np.arange(5.0)) == 0.0
    assert metrics.krcc(np.ones(5), np.arange(5.0)) == 0.0


@pytest.mark.parametrize(
    "pred, target, message",
    [
        (np.arange(3.0), np.arange(4.0), "differ in length"),
        (np.array([1.0]), np.array([1.0]), "at least 2"),
        (np.array([1.0, np.nan]), np.array([1.0, 2.0]), "NaN"),
    ],
)
def test_bad_inputs_raise_clear_errors(pred, target, message):
    with pytest.raises(ValueError, match=message):
        metrics.srcc(pred, target)
