"""Metrics in vol points against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from vforge.evaluation.metrics import format_table, split_metrics


def test_model_baseline_and_persistence_are_scored_like_for_like():
    true = np.array([0.20, 0.22, 0.30, 0.25])
    pred = np.array([0.21, 0.22, 0.28, 0.25])
    persistence = np.array([0.19, np.nan, 0.30, 0.27])  # the second contract is new today
    base = np.array([0.19, 0.26, 0.30, 0.27])  # ... and falls back to the previous surface
    m = split_metrics("val", pred, true, persistence, base)
    assert m["val/rmse"] == pytest.approx(np.sqrt((1 + 0 + 4 + 0) / 4))  # vol points
    assert m["val/mae"] == pytest.approx((1 + 0 + 2 + 0) / 4)
    assert m["val/baseline_rmse"] == pytest.approx(np.sqrt((1 + 16 + 0 + 4) / 4))
    assert m["val/persistence_rmse"] == pytest.approx(np.sqrt((1 + 0 + 4) / 3))
    assert m["val/prev_quoted_rmse"] == pytest.approx(np.sqrt((1 + 4 + 0) / 3))
    ss_tot = np.sum((true - true.mean()) ** 2) * 1e4
    assert m["val/r2"] == pytest.approx(1 - 5 / ss_tot)
    table = format_table(m | {f"test/{k[4:]}": v for k, v in m.items()}, {"val": (4, 3), "test": (4, 3)})
    assert "prev. quoted" in table and f"{m['val/baseline_rmse']:.3f}" in table


def test_conformal_offset_makes_validation_intervals_cover_the_nominal_share():
    from vforge.evaluation.metrics import conformal_metrics

    rng = np.random.default_rng(0)
    true = 0.2 + 0.01 * rng.standard_normal(2000)
    # Intervals half as wide as needed: raw 90% intervals cover far less than 90%.
    half = 0.5 * 1.645 * 0.01
    levels = np.column_stack([np.full_like(true, 0.2 - half), np.full_like(true, 0.2), np.full_like(true, 0.2 + half)])
    val, test = slice(0, 1000), slice(1000, 2000)
    m = conformal_metrics(levels[val], true[val], levels[test], true[test], [(0, 2, 0.9)])
    # The offset is the val quantile of max(lo - y, y - hi): by hand, with the same finite-sample level.
    scores = np.maximum(levels[val, 0] - true[val], true[val] - levels[val, 2])
    expected = np.quantile(scores, np.ceil(1001 * 0.9) / 1000, method="higher")
    assert m["val/conformal_offset90"] == pytest.approx(expected * 100)
    assert 0.86 <= m["test/conformal_coverage90"] <= 0.94  # exchangeable halves: close to nominal
    assert m["test/conformal_width90"] == pytest.approx((2 * half + 2 * expected) * 100)
