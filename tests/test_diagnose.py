"""scripts/diagnose.py: the diagnosis of a run's predictions against hand-made cases."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import diagnose as D  # noqa: E402


def frame(model_share: float, n_dates: int = 20, seed: int = 0) -> pd.DataFrame:
    """Previously quoted rows whose model predicts ``model_share`` of the true change, plus new contracts with a wild
    model (which the diagnosis must ignore); two tenors, dates over two quarters."""
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2024-03-18", periods=n_dates)
    rows = []
    for d in dates:
        for tau in (7 / 365, 90 / 365):
            change = rng.normal(0, 0.01, 10)
            rows.append(pd.DataFrame({"target_date": d, "tau": tau, "prev_quoted": True, "persistence": 0.2,
                                      "market": 0.2 + change, "model": 0.2 + model_share * change}))
        rows.append(pd.DataFrame({"target_date": [d], "tau": [0.1], "prev_quoted": [False], "persistence": [np.nan],
                                  "market": [0.2], "model": [0.9]}))
    return pd.concat(rows, ignore_index=True)


@pytest.mark.parametrize("share", [0.5, 2.0])
def test_a_model_predicting_a_share_of_the_change_has_the_inverse_scale_and_no_error_there(share):
    d = D.diagnose(frame(share))
    assert d["rows"] == 20 * 2 * 10  # the new contracts left out
    assert d["ratio"] == pytest.approx(abs(1 - share))  # error (share - 1) x change against persistence's -change
    assert d["scale"] == pytest.approx(1 / share)
    assert d["ratio_at_scale"] == pytest.approx(0.0, abs=1e-9)
    assert d["corr"] == pytest.approx(1.0)
    assert list(d["tenors"].index) == ["<2w", "45d-4m"]  # in tenor order, empty buckets left out
    assert d["tenors"]["share"].sum() == pytest.approx(1.0) and d["quarters"]["share"].sum() == pytest.approx(1.0)
    assert list(d["quarters"].index) == ["2024Q1", "2024Q2"]
    assert d["tenors"]["ratio"].tolist() == pytest.approx([abs(1 - share)] * 2)


def test_the_worst_dates_share_and_the_ratio_without_them():
    f = frame(0.5)
    worst = f["target_date"] == f["target_date"].iloc[0]
    f.loc[worst & f["prev_quoted"], "market"] = 0.2 + 1.0  # one huge date where the model predicts nothing
    f.loc[worst & f["prev_quoted"], "model"] = 0.2
    d = D.diagnose(f, top=1)
    assert d["top_share"] > 0.99
    assert d["ratio_without_top"] == pytest.approx(0.5)  # the other dates: half the change predicted
    assert d["ratio"] == pytest.approx(1.0, abs=0.01)  # persistence on the date that decides
    assert "the 1 worst dates" in D.format_diagnosis("test", d, top=1)
