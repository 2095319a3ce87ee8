"""The feature library: smile interpolation, leave-one-out, surface summaries, market state, names."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vforge.data import features as feats
from vforge.data.dataset import build_rows


def nodes(taus, ks, iv_fn):
    return pd.DataFrame([{"tau": t, "log_moneyness": k, "iv": iv_fn(t, k)} for t in taus for k in ks])


def test_surface_at_nodes_between_strikes_and_across_expiries():
    surf = nodes([0.1, 0.5], [-0.2, 0.0, 0.2], lambda t, k: 0.2 + 0.1 * abs(k) + 0.05 * t)
    # Exact at the nodes; linear in log-moneyness between strikes.
    np.testing.assert_allclose(feats.surface_at(surf, [-0.2, 0.0, 0.2], [0.1, 0.1, 0.5]), [0.225, 0.205, 0.245])
    np.testing.assert_allclose(feats.surface_at(surf, [0.1], [0.5]), [0.235])
    # Between expiries: total variance linear in tau.
    w1, w2 = 0.205**2 * 0.1, 0.225**2 * 0.5
    expected = np.sqrt((w1 + (w2 - w1) * 0.5) / 0.3)
    np.testing.assert_allclose(feats.surface_at(surf, [0.0], [0.3]), [expected])
    # Outside the expiries: flat vol.
    np.testing.assert_allclose(feats.surface_at(surf, [0.0, 0.0], [0.01, 2.0]), [0.205, 0.225])


def test_wings_continue_when_rising_and_stay_flat_when_falling():
    surf = nodes([0.25], [-0.1, 0.0, 0.1], lambda t, k: {-0.1: 0.30, 0.0: 0.20, 0.1: 0.18}[k])
    left, right = feats.surface_at(surf, [-0.3, 0.3], [0.25, 0.25])
    assert left == pytest.approx(0.30 + 1.0 * 0.2)  # slope 1 vol per unit of k continued outward
    assert right == pytest.approx(0.18)  # the right wing falls: flat


def test_leave_one_out_uses_the_neighbours_only():
    day = pd.DataFrame({"date_idx": 0, "option_type": "C", "expiry": pd.Timestamp("2024-06-21"),
                        "log_moneyness": [-0.2, -0.1, 0.0, 0.2], "iv": [0.30, 0.99, 0.20, 0.10]})
    other = day.assign(option_type="P", iv=0.5)
    loo = feats.smile_leave_one_out(pd.concat([day, other], ignore_index=True))
    # k=-0.1 from (-0.2, 0.30) and (0.0, 0.20): its own 0.99 is left out; ends take their neighbour.
    np.testing.assert_allclose(loo[:4], [0.99, 0.25, 0.99 + (0.10 - 0.99) / 3, 0.20])
    np.testing.assert_allclose(loo[4:], 0.5)


def test_market_state_uses_the_past_only():
    spot = pd.Series(100.0 * np.exp(np.cumsum(np.r_[0.0, np.full(30, 0.01)])))
    state = feats.market_state(spot)
    np.testing.assert_allclose(state["spot_ret_1d"].iloc[1:], 0.01)
    assert state["spot_ret_1d"].iloc[0] == 0.0 and state["realized_vol_21d"].iloc[0] == 0.0
    np.testing.assert_allclose(state["spot_ret_5d"].iloc[10], 0.05)
    np.testing.assert_allclose(state["spot_ret_5d"].iloc[2], 0.02)  # a shorter window at the start, not a later value
    # Changing the future changes nothing before it.
    later = spot.copy()
    later.iloc[20:] *= 1.5
    pd.testing.assert_frame_equal(feats.market_state(later).iloc[:20], state.iloc[:20])


def test_surface_state_on_a_known_surface():
    day = nodes([20 / 365, 40 / 365, 120 / 365], np.linspace(-0.2, 0.2, 9), lambda t, k: 0.2 - 0.5 * k + 0.1 * t)
    day = pd.concat([day.assign(option_type="C"), day.assign(option_type="P")], ignore_index=True)
    state = feats.surface_state(day)
    t30 = 30 / 365
    w = lambda t: (0.2 + 0.1 * t) ** 2 * t  # noqa: E731
    atm = np.sqrt((w(20 / 365) + (w(40 / 365) - w(20 / 365)) * 0.5) / t30)
    assert state["prev_atm_iv"] == pytest.approx(atm, rel=1e-12)
    assert state["prev_skew"] == pytest.approx(0.5, rel=1e-2)
    assert state["prev_term_slope"] > 0


def test_previous_surface_fallback_is_the_neighbours_smile_at_the_strike():
    """A strike not quoted yesterday gets yesterday's smile at its strike (sticky strike)."""
    dates = pd.to_datetime(["2024-03-01", "2024-03-04"])
    expiry = pd.Timestamp("2024-06-21")
    rows = []
    for d, strikes in ((dates[0], [90.0, 100.0, 110.0]), (dates[1], [90.0, 95.0, 100.0, 110.0])):
        for k in strikes:
            rows.append({"quote_date": d, "expiry": expiry, "strike": k, "option_type": "P", "underlying_price": 100.0,
                         "implied_volatility": 0.2 + 0.001 * (100 - k), "rate": 0.0, "dividend_yield": 0.0})
    built = build_rows(pd.DataFrame(rows), horizon=0, fallback="strike")
    out, report = built.rows, built.report
    new = out[out["strike"] == 95.0].iloc[0]
    assert new["prev_iv_missing"] == 1.0 and np.isnan(new["persistence"])
    tau = (expiry - dates[0]).days / 365
    k95, k90, k100 = np.log(95.0 / 100.0), np.log(0.9), 0.0
    expected = 0.21 + (k95 - k90) / (k100 - k90) * (0.20 - 0.21)
    assert new["prev_iv"] == pytest.approx(expected, rel=1e-12) and new["base"] == new["prev_iv"]
    assert tau > 0 and report["rows_without_previous_quote"] == 1
    old = out[out["strike"] == 100.0].iloc[0]
    # A quoted contract: its own quote, and its distance to the smile of its neighbours (90 and 110).
    loo = 0.21 + (0.0 - k90) / (np.log(1.1) - k90) * (0.19 - 0.21)
    assert old["prev_iv"] == pytest.approx(0.20) and old["prev_iv_resid"] == pytest.approx(0.20 - loo, rel=1e-9)


def test_moneyness_fallback_reads_the_previous_surface_at_todays_coordinates():
    """After a large spot move, the new strike is read at its own log-moneyness and time to expiry."""
    dates = pd.to_datetime(["2024-03-01", "2024-03-04"])
    expiry = pd.Timestamp("2024-06-21")
    rows = []
    for d, spot, strikes in ((dates[0], 100.0, [90.0, 100.0, 110.0]), (dates[1], 120.0, [100.0, 120.0])):
        for k in strikes:
            rows.append({"quote_date": d, "expiry": expiry, "strike": k, "option_type": "P", "underlying_price": spot,
                         "implied_volatility": 0.2 - 0.2 * np.log(k / spot), "rate": 0.0, "dividend_yield": 0.0})
    out = build_rows(pd.DataFrame(rows), horizon=0, fallback="moneyness").rows
    new = out[out["strike"] == 120.0].iloc[0]  # at the money today: yesterday's ATM IV, 0.2
    assert new["prev_iv_missing"] == 1.0 and new["prev_iv"] == pytest.approx(0.2, rel=1e-12)
    strike = build_rows(pd.DataFrame(rows), horizon=0, fallback="strike").rows
    # Sticky strike reads yesterday's smile at K=120 (beyond its strikes: the rising left wing is not there, flat).
    assert strike[strike["strike"] == 120.0].iloc[0]["prev_iv"] == pytest.approx(0.2 - 0.2 * np.log(1.1), rel=1e-12)


def test_unknown_feature_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown feature\(s\) \['moneyness'\] in data.features; valid names: log_moneyness"):
        feats.validate_names(["moneyness"])
    with pytest.raises(ValueError, match=r"data.cat_features"):
        feats.validate_names([], ["sector"])


def test_every_feature_documents_what_it_uses():
    assert all(len(text) > 15 for text in feats.FEATURES.values())


def test_at_terms_at_a_rows_own_terms_gives_back_its_features_and_moves_only_terms_features(make_cfg):
    from hydra.utils import instantiate

    names = ["log_moneyness", "tau", "sqrt_tau", "moneyness_std", "delta", "prev_iv_resid", "gap_days",
             "sticky_moneyness_change", "prev_smile_slope", "prev_smile_curvature", "prev_smile_iv", "spot_ret_1d_vol"]
    data = instantiate(make_cfg(f"data.features=[{','.join(names)}]").data, _convert_="all")
    split, rows = data.train, data.train.rows
    contracts = pd.DataFrame({"prev_iv": split.base, "is_call": (rows["option_type"] == "C").astype(float),
                              "rate": rows["rate"], "dividend_yield": rows["dividend_yield"],
                              "info_idx": rows["info_idx"]})
    x = split.x_num.double().numpy()
    k, tau = rows["log_moneyness"].to_numpy(), rows["tau"].to_numpy()
    same = feats.at_terms(x, names, data.x_mean, data.x_std, contracts, data.quotes, k, tau)
    np.testing.assert_allclose(same, x, atol=2e-5)  # x_num is float32
    moved = feats.at_terms(x, names, data.x_mean, data.x_std, contracts, data.quotes, k + 0.05, tau + 0.1)
    changed = {n for j, n in enumerate(names) if not np.allclose(moved[:, j], x[:, j], atol=1e-4)}
    assert changed == set(names) & set(feats.TERMS_FEATURES)
    j = names.index("moneyness_std")  # by hand: (k / (prev_iv sqrt(tau)) - mean) / std at the new terms
    expect = ((k + 0.05) / (split.base * np.sqrt(tau + 0.1)) - data.x_mean[j]) / data.x_std[j]
    np.testing.assert_allclose(moved[:, j], expect, rtol=1e-12)


def test_group_positions_are_groupbys_indices():
    """The rows of each distinct key tuple, ascending, as pandas' groupby gives them (one key or several, one group
    or many; the features group a served date's rows and a training chain's by this)."""
    rng = np.random.default_rng(0)
    info = rng.integers(0, 4, 200)
    option_type = rng.choice(np.array(["C", "P"], dtype=object), 200)
    frame = pd.DataFrame({"info": info, "option_type": option_type})
    for keys, by in (((info,), ["info"]), ((info, option_type), ["info", "option_type"]),
                     ((np.full(5, 3), np.array(["P"] * 5, dtype=object)), None)):
        expected = (frame.groupby(by, sort=False).indices if by else {(3, "P"): np.arange(5)})
        got = feats.group_positions(*keys)
        expected = {k if isinstance(k, tuple) else (k,): v for k, v in expected.items()}
        assert got.keys() == expected.keys()
        for k in got:
            np.testing.assert_array_equal(got[k], expected[k])
    assert feats.group_positions(np.empty(0)) == {}
