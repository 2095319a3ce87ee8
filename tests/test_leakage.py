"""No look-ahead: later rows never move an earlier row's features, test rows never move the scaler,
and persistence is the previous date's quote of the same contract, nothing else."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vforge.data.chain import normalize
from vforge.data.dataset import CONTRACT, build_rows, prepare
from vforge.data.features import FEATURES
from vforge.data.synthetic import generate_chain

TINY = dict(seed=3, n_days=30, spot0=100.0, rate=0.02, dividend_yield=0.01,
            heston=dict(kappa=2.0, theta=0.04, sigma=0.6, rho=-0.7, v0=0.04),
            jumps=dict(intensity=0.0, mean=0.0, std=0.0),
            listing=dict(n_monthlies=3, n_weeklies=2, strike_step=5.0, moneyness_range=[0.8, 1.2]),
            quotes=dict(half_spread_vol=0.0025, missing_fraction=0.05))
ALL = list(FEATURES)


@pytest.fixture(scope="module")
def chain() -> pd.DataFrame:
    return normalize(generate_chain(**TINY), columns={}, iv_unit="decimal", rate=0.02, dividend_yield=0.01,
                     report={}, max_spread_vol=0.05)


def features_by_key(chain: pd.DataFrame, horizon: int) -> pd.DataFrame:
    rows = build_rows(chain, horizon=horizon).rows
    return rows.set_index(["quote_date", *CONTRACT])[ALL + ["base", "persistence"]].sort_index()


@pytest.mark.parametrize("horizon", [0, 2])
@pytest.mark.parametrize("change", ["perturb", "delete"])
def test_rows_after_t_do_not_move_features_at_t(chain, horizon, change):
    dates = np.sort(chain["quote_date"].unique())
    t = dates[len(dates) // 2]
    later = chain["quote_date"] > t
    other = chain.copy()
    if change == "perturb":  # every later quote: a different IV and a different spot
        other.loc[later, "implied_volatility"] *= 1.7
        other.loc[later, ["underlying_price", "forward"]] *= 1.1
    else:  # later quotes gone, and a whole later date gone
        rng = np.random.default_rng(0)
        other = other[~(later & (rng.random(len(other)) < 0.5)) & (other["quote_date"] != dates[-3])]
    before, after = features_by_key(chain, horizon), features_by_key(other, horizon)
    up_to_t = before.index.get_level_values("quote_date") <= t
    common = before.index[up_to_t].intersection(after.index)
    assert len(common) > 0.5 * up_to_t.sum()
    pd.testing.assert_frame_equal(before.loc[common], after.loc[common], check_exact=True)


def test_test_rows_do_not_move_the_scaler(chain):
    kwargs = dict(features=ALL, target="change", horizon=0, val_fraction=0.2, test_fraction=0.2)
    ds = prepare(chain, **kwargs)
    first_test = ds.test.rows["quote_date"].min()
    other = chain.copy()
    late = other["quote_date"] >= first_test
    other.loc[late, "implied_volatility"] *= 2.0
    other.loc[late, ["underlying_price", "forward"]] *= 0.8
    ds2 = prepare(other, **kwargs)
    np.testing.assert_array_equal(ds.x_mean, ds2.x_mean)
    np.testing.assert_array_equal(ds.x_std, ds2.x_std)
    assert (ds.y_center, ds.y_scale) == (ds2.y_center, ds2.y_scale)
    np.testing.assert_array_equal(ds.train.x_num.numpy(), ds2.train.x_num.numpy())
    assert not np.allclose(ds.test.iv, ds2.test.iv)  # the change did reach the test rows


def test_persistence_uses_only_the_previous_date(chain):
    dates = np.sort(chain["quote_date"].unique())
    j = len(dates) // 2
    at_j = lambda c: features_by_key(c, 0).xs(dates[j], level="quote_date")["persistence"]  # noqa: E731
    base = at_j(chain)
    # Two dates back: nothing moves. The previous date: persistence is exactly its IV.
    two_back = chain.assign(implied_volatility=np.where(chain["quote_date"] == dates[j - 2],
                                                        chain["implied_volatility"] + 0.05, chain["implied_volatility"]))
    pd.testing.assert_series_equal(at_j(two_back), base)
    one_back = chain.assign(implied_volatility=np.where(chain["quote_date"] == dates[j - 1],
                                                        chain["implied_volatility"] + 0.05, chain["implied_volatility"]))
    moved = at_j(one_back) - base
    np.testing.assert_allclose(moved.dropna(), 0.05, atol=1e-12)

def test_horizon_0_features_never_see_the_target_date_surface(chain):
    """Re-marking today: today's quotes are the targets, never inputs, of today's rows."""
    dates = np.sort(chain["quote_date"].unique())
    today = chain["quote_date"] == dates[len(dates) // 2]
    bumped = chain.assign(implied_volatility=np.where(today, chain["implied_volatility"] + 0.3,
                                                      chain["implied_volatility"]))
    before, after = features_by_key(chain, 0), features_by_key(bumped, 0)
    at = before.index.get_level_values("quote_date") == dates[len(dates) // 2]
    pd.testing.assert_frame_equal(before[at], after[at], check_exact=True)
