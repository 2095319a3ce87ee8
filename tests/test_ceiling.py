"""scripts/ceiling.py: the per-bucket fit of the true IV change on the spot move, against hand-made cases."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import ceiling as C  # noqa: E402


def test_bucket_fit_recovers_each_buckets_quadratic_and_predicts_no_change_in_an_unseen_bucket():
    rng = np.random.default_rng(0)
    coef = {b: rng.normal(size=3) for b in (101, 102, 305)}
    rows = pd.DataFrame({"bucket": rng.choice(list(coef), 600), "x": rng.normal(size=600), "true_p": 0.2})
    rows["true_t"] = rows["true_p"] + [coef[b] @ [1, x, x * x] for b, x in zip(rows["bucket"], rows["x"])]
    fit = C.bucket_fit(rows)
    assert set(fit) == set(coef)
    for b in coef:
        np.testing.assert_allclose(fit[b], coef[b], atol=1e-10)
    unseen = pd.DataFrame({"bucket": [999, 101], "x": [1.5, 0.5]})
    np.testing.assert_allclose(C.bucket_predict(fit, unseen), [0.0, coef[101] @ [1, 0.5, 0.25]], atol=1e-10)


def test_true_changes_keeps_quoted_rows_with_both_model_ivs_and_buckets_by_tenor_and_moneyness():
    d0, d1 = pd.Timestamp("2024-01-02"), pd.Timestamp("2024-01-03")
    exp = pd.Timestamp("2024-06-21")
    rows = pd.DataFrame({"target_date": d1, "info_date": d0, "expiry": exp, "strike": [90.0, 100.0, 110.0],
                         "option_type": "C", "tau": [0.03, 0.3, 0.3]})
    names = ["moneyness_std", "spot_ret_1d_vol"]
    split = SimpleNamespace(rows=rows, iv=np.array([0.25, 0.2, 0.22]), persistence=np.array([0.24, np.nan, 0.21]),
                            x_num=torch.tensor([[-1.5, 0.3], [0.0, 0.3], [0.7, 0.3]]))
    model_iv = pd.DataFrame({"quote_date": [d0, d1, d0, d1, d1], "expiry": exp,
                             "strike": [90.0, 90.0, 100.0, 100.0, 110.0], "option_type": "C",
                             "model_iv": [0.241, 0.249, 0.2, 0.2, 0.22]})
    out = C.true_changes(split, names, model_iv)
    # the 100 strike was not quoted on the info date; the 110 strike has no model IV there
    assert out["strike"].tolist() == [90.0]
    row = out.iloc[0]
    assert (row["true_p"], row["true_t"], row["x"]) == (0.241, 0.249, np.float32(0.3))
    assert row["bucket"] == 1 * 100 + 2  # tenor below 0.05 years, moneyness in [-2, -1)
