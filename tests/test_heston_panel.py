"""scripts/heston_panel.py: QuantLib's Heston prices against vforge's COS pricer, and the chain loader's IVs of a
QuantLib panel against QuantLib's own Black-Scholes inversion (two independent implementations each)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import QuantLib as ql

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import heston_panel as H  # noqa: E402

from vforge.data.chain import normalize  # noqa: E402
from vforge.data.heston import heston_price  # noqa: E402

DAY = ql.Date(14, 3, 2022)


def test_quantlib_prices_match_vforge_cos_pricer():
    market = H.Market()
    frame = H.model_prices(market, DAY, 103.7, 0.061)
    tau = np.array([(ql.DateParser.parseISO(e) - DAY) / 365.0 for e in frame["expiry"]])
    cos = heston_price(103.7, frame["strike"].to_numpy(), tau, market.rate, market.dividend,
                       (frame["option_type"] == "C").to_numpy(), v0=0.061, kappa=market.kappa,
                       theta=market.theta, sigma=market.sigma, rho=market.rho, n_terms=1024)
    assert len(frame) > 300 and tau.min() < 0.02 and tau.max() > 0.9  # short and long expiries both checked
    np.testing.assert_allclose(frame["model_price"], cos, atol=1e-8)
    # and put-call parity holds in QuantLib's prices: C - P = S exp(-q T) - K exp(-r T)
    calls, puts = frame[frame["option_type"] == "C"], frame[frame["option_type"] == "P"]
    t = tau[frame["option_type"].to_numpy() == "C"]
    parity = 103.7 * np.exp(-market.dividend * t) - calls["strike"].to_numpy() * np.exp(-market.rate * t)
    np.testing.assert_allclose(calls["model_price"].to_numpy() - puts["model_price"].to_numpy(), parity, atol=1e-8)


def quantlib_iv(row, spot: float, market: H.Market) -> float:
    count = ql.Actual365Fixed()
    process = ql.BlackScholesMertonProcess(
        ql.QuoteHandle(ql.SimpleQuote(spot)),
        ql.YieldTermStructureHandle(ql.FlatForward(DAY, market.dividend, count)),
        ql.YieldTermStructureHandle(ql.FlatForward(DAY, market.rate, count)),
        ql.BlackVolTermStructureHandle(ql.BlackConstantVol(DAY, ql.NullCalendar(), 0.2, count)))
    kind = ql.Option.Call if row.option_type == "C" else ql.Option.Put
    option = ql.VanillaOption(ql.PlainVanillaPayoff(kind, float(row.strike)),
                              ql.EuropeanExercise(ql.DateParser.parseISO(row.expiry)))
    option.setPricingEngine(ql.AnalyticEuropeanEngine(process))
    return option.impliedVolatility(0.5 * (row.bid + row.ask), process, 1e-12, 1000, 1e-4, 5.0)


def test_loader_inverts_a_quantlib_panel_as_quantlib_does():
    # a noise-free day (tiny tick and spread): every kept row's IV is the Black-Scholes IV of its mid
    market = H.Market(tick=1e-9, half_spread=1e-7, mid_noise=0.0)
    quotes = H.day_quotes(market, DAY, 98.2, 0.045, np.random.default_rng(0))
    report: dict = {}
    chain = normalize(quotes, report=report, itm_from_otm=False)
    assert len(chain) > 0.8 * len(quotes)  # at most the deep-ITM rows without time value go
    assert chain.index.isin(quotes.index).all()
    rows = quotes.loc[chain.index]
    want = np.array([quantlib_iv(r, 98.2, market) for r in rows.itertuples()])
    np.testing.assert_allclose(chain["implied_volatility"].to_numpy(), want, atol=1e-10)
    # Heston with rho < 0 makes a skew: puts far below the money carry more vol than calls far above it
    k = np.log(rows["strike"].to_numpy() / 98.2)
    assert want[k < -0.15].mean() > want[k > 0.15].mean() + 0.02


def test_variants_are_written_once_and_named_by_what_differs(tmp_path):
    path = H.write(2, tmp_path, n_dates=3)
    panel = pd.read_csv(path)
    assert path.name == "variant2.csv" and panel["quote_date"].nunique() == 3
    # variant 2's wide quotes: half the spread is 4% of the price (at least a tick), as VARIANTS says
    mid = 0.5 * (panel["bid"] + panel["ask"])
    wide = mid > 5
    assert ((panel["ask"] - panel["bid"])[wide] / mid[wide]).median() == pytest.approx(0.08, abs=0.002)
    assert (panel["bid"] >= 0).all() and (panel["ask"] >= 0.01).all() and (panel["bid"] <= panel["ask"]).all()
    stamp = path.stat().st_mtime_ns
    assert H.write(2, tmp_path, n_dates=3).stat().st_mtime_ns == stamp  # cached, not rewritten
    assert H.write(2, tmp_path, {"mu": 0.0, "rho": -0.9}, n_dates=3).name == "variant2_rho-0.9.csv"


def test_truth_file_holds_each_quotes_model_price_and_the_panel_stays_the_same(tmp_path):
    path = H.write(2, tmp_path / "plain", n_dates=3)
    with_truth = H.write(2, tmp_path / "truth", n_dates=3, truth=True)
    panel, truth = pd.read_csv(with_truth), pd.read_parquet(H.truth_path(with_truth))
    # the chain table is the one written without truth (one random stream), and shows no truth column
    pd.testing.assert_frame_equal(panel, pd.read_csv(path))
    assert not set(H.TRUTH) & set(panel.columns)
    both = panel.merge(truth, on=["quote_date", "expiry", "strike", "option_type"], validate="one_to_one")
    assert len(both) == len(panel) and both["variance"].groupby(both["quote_date"]).nunique().eq(1).all()
    # variant 2's mid is the model price plus noise of half the half spread (4% of the price): within 5 sd of it
    mid, price = 0.5 * (both["bid"] + both["ask"]), both["model_price"]
    half = np.maximum(0.04 * price, 0.01)
    assert (np.abs(mid - price) <= 5 * 0.5 * half + 0.01).all()
    assert 0.2 < ((mid - price) / half)[price > 5].std() < 0.7
