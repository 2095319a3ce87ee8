"""Foundation checks of the data pipeline: persistence on a hand-made chain, a leak-free split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate

from vforge.data.dataset import prepare

FEATURES = ["log_moneyness", "tau", "is_call", "prev_iv", "prev_iv_missing", "gap_days"]


def hand_made_chain() -> pd.DataFrame:
    """Four quote dates with a weekend-and-more gap; contract B skips the second date."""
    dates = pd.to_datetime(["2024-03-01", "2024-03-04", "2024-03-05", "2024-03-08"])  # Fri, Mon, Tue, Fri
    iv = {  # contract -> IV per date (NaN: not quoted)
        ("2024-06-21", 100.0, "C"): [0.20, 0.21, 0.23, 0.22],
        ("2024-06-21", 90.0, "P"): [0.25, np.nan, 0.27, 0.26],
        ("2024-09-20", 110.0, "C"): [0.18, 0.185, 0.19, 0.20],
    }
    rows = [
        {"quote_date": d, "expiry": pd.Timestamp(e), "strike": k, "option_type": t, "underlying_price": 100.0 + i,
         "implied_volatility": v[i], "rate": 0.0, "dividend_yield": 0.0}
        for (e, k, t), v in iv.items() for i, d in enumerate(dates) if np.isfinite(v[i])
    ]
    return pd.DataFrame(rows), iv, dates


def test_persistence_is_the_previous_present_date_of_the_same_contract():
    chain, iv, dates = hand_made_chain()
    ds = prepare(chain, features=FEATURES, target="change", horizon=0, val_fraction=0.34, test_fraction=0.34)
    seen = 0
    for split in (ds.train, ds.val, ds.test):
        for j, row in split.rows.iterrows():
            i = list(dates).index(row["quote_date"])
            series = iv[(row["expiry"].strftime("%Y-%m-%d"), row["strike"], row["option_type"])]
            assert split.iv[j] == pytest.approx(series[i])
            prev = series[i - 1]  # the previous date present in the data, whatever the gap
            if np.isfinite(prev):
                assert split.persistence[j] == pytest.approx(prev)
            else:
                assert np.isnan(split.persistence[j])
            seen += 1
    # Every row but the first date's; and the put new on Tuesday, which has no previous quote and no
    # previous put surface to fall back on, is dropped and counted, not lost silently.
    assert seen == len(chain) - 3 - 1
    assert n_dropped(ds.report) >= 1

    # The change target is added back onto the base: levels come out exactly.
    level = ds.to_level(ds.test.y.numpy(), ds.test)
    np.testing.assert_allclose(level, ds.test.iv, atol=1e-6)


def n_dropped(report) -> int:
    """All counts under report keys that mention dropping, however nested."""
    if isinstance(report, dict):
        return sum(v if isinstance(v, int) and "drop" in k else n_dropped(v) for k, v in report.items())
    return 0


def test_gap_days_counts_calendar_days_to_the_previous_date():
    chain, _, dates = hand_made_chain()
    ds = prepare(chain, features=FEATURES, target="level", horizon=0, val_fraction=0.34, test_fraction=0.34)
    col = FEATURES.index("gap_days")
    gaps = {}
    for split in (ds.train, ds.val, ds.test):
        raw = split.x_num[:, col].numpy() * ds.x_std[col] + ds.x_mean[col]
        gaps |= dict(zip(split.rows["quote_date"], np.round(raw, 6)))
    assert gaps == {dates[1]: 3.0, dates[2]: 1.0, dates[3]: 3.0}


@pytest.mark.parametrize("horizon", [0, 2])
def test_split_is_chronological_with_an_embargo(make_cfg, horizon):
    cfg = make_cfg(f"data.horizon={horizon}")
    ds = instantiate(cfg.data, _convert_="all")
    dates = {k: pd.DatetimeIndex(getattr(ds, k).rows["quote_date"]) for k in ("train", "val", "test")}
    assert dates["train"].max() < dates["val"].min() <= dates["val"].max() < dates["test"].min()
    all_dates = pd.DatetimeIndex(sorted(set().union(*dates.values())))
    # `horizon` quote dates are left out between the parts, so no target overlaps the next part's information.
    for a, b in (("train", "val"), ("val", "test")):
        gap = all_dates.get_loc(dates[b].min()) - all_dates.get_loc(dates[a].max())
        assert gap >= 1
    assert len(set(dates["train"]) & set(dates["val"])) == 0 and len(set(dates["val"]) & set(dates["test"])) == 0


def test_scaler_is_fit_on_train_only(make_cfg):
    ds = instantiate(make_cfg().data, _convert_="all")
    x = ds.train.x_num.numpy()
    centred = (ds.x_std != 1) & (ds.x_mean != 0)  # moves and residuals are scaled by their RMS, not centred
    np.testing.assert_allclose(x.mean(0)[centred], 0.0, atol=1e-4)
