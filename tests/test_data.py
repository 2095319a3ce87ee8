"""Loading chains through the contract: renames, spellings, units, clear errors, drops counted, forwards."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate

from vforge.data import chain as C
from vforge.data.dataset import format_report
from vforge.data.iv import bs_price


def make_chain(n_days: int = 12, seed: int = 0, spot0: float = 100.0, rate: float = 0.02, div: float = 0.01) -> pd.DataFrame:
    """A small chain priced by Black-Scholes on a smile: two expiries, strikes 80..120, calls and puts."""
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2024-03-01", periods=n_days)
    spot = spot0 * np.exp(np.cumsum(rng.normal(0, 0.01, n_days)))
    rows = []
    for i, d in enumerate(dates):
        for expiry in (pd.Timestamp("2024-04-19"), pd.Timestamp("2024-06-21")):
            tau = (expiry - d).days / 365
            fwd = spot[i] * np.exp((rate - div) * tau)
            for k in np.arange(80.0, 121.0, 5.0):
                lm = np.log(k / fwd)
                vol = 0.2 - 0.1 * lm + 0.3 * lm**2 + 0.002 * i
                for typ in ("C", "P"):
                    p = float(bs_price(fwd, k, tau, vol, rate, typ == "C"))
                    rows.append({"quote_date": d, "expiry": expiry, "strike": k, "option_type": typ,
                                 "underlying_price": spot[i], "bid": p - min(0.02, 0.5 * p),
                                 "ask": p + 0.02, "true_iv": vol})
    return pd.DataFrame(rows)


def write(df: pd.DataFrame, path) -> str:
    df.to_csv(path, index=False)
    return str(path)


def load(make_cfg, path, *overrides):
    cfg = make_cfg("data=chain", f"data.path={path}", "data.val_fraction=0.2", "data.test_fraction=0.2",
                   "data.rate=0.02", "data.dividend_yield=0.01", *overrides, tiny=False)
    return instantiate(cfg.data, _convert_="all")


def test_chain_loads_with_renamed_columns_and_spellings(make_cfg, tmp_path):
    df = make_chain().rename(columns={"strike": "K", "option_type": "cp", "quote_date": "date"})
    df["cp"] = df["cp"].map({"C": "call", "P": "Put"})
    path = write(df, tmp_path / "chain.csv")
    ds = load(make_cfg, path, "data.columns.strike=K", "data.columns.option_type=cp", "data.columns.quote_date=date")
    assert len(ds.train) > 0 and len(ds.val) > 0 and len(ds.test) > 0
    # IV inverted from the mid sits within the bid/ask half-spread of the smile that priced it.
    assert np.nanmax(np.abs(ds.test.iv - 0.2)) < 0.2
    text = format_report(ds.report)
    assert "rows loaded" in text and "train" in text


def test_parquet_and_csv_load_the_same(make_cfg, tmp_path):
    df = make_chain()
    a = load(make_cfg, write(df, tmp_path / "c.csv"))
    df.to_parquet(tmp_path / "c.parquet", index=False)
    b = load(make_cfg, str(tmp_path / "c.parquet"))
    np.testing.assert_allclose(a.test.iv, b.test.iv)


def error(make_cfg, df, tmp_path, *overrides) -> str:
    with pytest.raises(Exception) as info:
        load(make_cfg, write(df, tmp_path / "bad.csv"), *overrides)
    return str(info.value)


def test_missing_column_names_it_and_the_override(make_cfg, tmp_path):
    msg = error(make_cfg, make_chain().rename(columns={"strike": "strike_price"}), tmp_path)
    assert "required column(s) ['strike'] not found" in msg
    assert "data.columns.strike=<your column name>" in msg and "strike_price" in msg


def test_missing_underlying_suggests_parity(make_cfg, tmp_path):
    msg = error(make_cfg, make_chain().drop(columns="underlying_price"), tmp_path)
    assert "underlying_price" in msg and "data.forward=parity" in msg


def test_percent_iv_declared_decimal(make_cfg, tmp_path):
    df = make_chain().assign(implied_volatility=lambda d: d["true_iv"] * 100)
    msg = error(make_cfg, df, tmp_path)
    assert "data.iv_unit=decimal but the implied volatilities look like percent" in msg
    assert "Set data.iv_unit=percent" in msg
    # Declared right, it loads and the values are decimals.
    ds = load(make_cfg, write(df, tmp_path / "ok.csv"), "data.iv_unit=percent")
    assert 0.1 < np.median(ds.train.iv) < 0.4


def test_expiry_before_quote_date_lists_rows(make_cfg, tmp_path):
    df = make_chain()
    df.loc[[3, 10, 11], "expiry"] = pd.Timestamp("2024-01-19")
    msg = error(make_cfg, df, tmp_path)
    assert "expiry must not be before quote_date" in msg and "3 row(s), e.g. rows [3, 10, 11]" in msg


@pytest.mark.parametrize(
    ("column", "value", "rule"),
    [("strike", -5.0, "strike must be > 0"), ("bid", -0.1, "bid must be >= 0"),
     ("ask", 0.001, "bid must not exceed ask"), ("quote_date", "not a date", "quote_date: unparseable"),
     ("option_type", "X", "option_type: unknown spellings ['x']")],
)
def test_impossible_values_are_errors_with_rows(make_cfg, tmp_path, column, value, rule):
    df = make_chain()
    df[column] = df[column].astype(object)
    df.loc[[2, 7], column] = value
    if column == "ask":
        df.loc[[2, 7], "bid"] = 1.0
    msg = error(make_cfg, df, tmp_path)
    assert rule in msg and "rows [2, 7]" in msg


def test_unusable_quotes_are_dropped_and_counted(make_cfg, tmp_path):
    df = make_chain()
    n = len(df)
    df.loc[0:4, "bid"] = 0.0                      # zero bids
    deep = df.index[(df["option_type"] == "C") & (df["strike"] == 80.0) & (df.index > 100)][:3]
    df.loc[deep, ["bid", "ask"]] = 0.5            # a call far below intrinsic
    df.loc[20:21, ["bid", "ask"]] = [500.0, 500.2]  # above the upper bound
    df = pd.concat([df, df.iloc[[30]]])          # a duplicate
    ds = load(make_cfg, write(df, tmp_path / "c.csv"), "data.duplicates=drop", "data.itm_from_otm=false")
    dropped = ds.report["dropped"]
    assert dropped["drop_zero_bid"] == 5
    assert dropped["drop_iv_price_at_or_below_intrinsic_value"] == 3
    assert dropped["drop_iv_price_at_or_above_the_no_arbitrage_upper_bound"] == 2
    assert dropped["drop_duplicate"] == 2
    assert ds.report["loaded"] == n + 1
    # Every loaded row is accounted for: used, or dropped with a reason.
    assert ds.report["quotes"] + sum(v for k, v in dropped.items() if k not in C.PIPELINE_DROPS) == n + 1
    assert "zero (or missing) bid" in format_report(ds.report)


def test_duplicates_are_an_error_by_default(make_cfg, tmp_path):
    df = make_chain()
    msg = error(make_cfg, pd.concat([df, df.iloc[[5]]]), tmp_path)
    assert "duplicate contracts" in msg and "data.duplicates=drop" in msg


def test_parity_forward_recovers_the_forward():
    df = make_chain(n_days=2)
    tau = (df["expiry"] - df["quote_date"]).dt.days.to_numpy() / 365
    mid = 0.5 * (df["bid"] + df["ask"])
    df = df.assign(rate=0.02, dividend_yield=0.01)
    fwd = C.parity_forward(df, mid, tau)
    true = df["underlying_price"] * np.exp(0.01 * tau)
    # Rounded bid/ask move each pair's K + (C - P) / D by at most a cent or two.
    np.testing.assert_allclose(fwd, true, atol=0.03)


def test_parity_forward_loads_without_a_spot(make_cfg, tmp_path):
    df = make_chain().drop(columns="underlying_price")
    ds = load(make_cfg, write(df, tmp_path / "c.csv"), "data.forward=parity")
    assert len(ds.test) > 0 and np.isfinite(ds.test.iv).all()


def test_otm_rows_without_type_and_given_iv_bid_ask(make_cfg, tmp_path):
    df = make_chain()
    df["fwd"] = df["underlying_price"] * np.exp(0.01 * (df["expiry"] - df["quote_date"]).dt.days / 365)
    otm = np.where(df["option_type"] == "C", df["strike"] >= df["fwd"], df["strike"] < df["fwd"])
    df = df[otm].assign(bid_iv=lambda d: d["true_iv"] - 0.005, ask_iv=lambda d: d["true_iv"] + 0.005)
    df = df.drop(columns=["option_type", "bid", "ask", "underlying_price"])
    ds = load(make_cfg, write(df, tmp_path / "c.csv"), "data.forward=column", "data.option_type=otm",
              "data.columns.forward=fwd", "data.columns.iv_bid=bid_iv", "data.columns.iv_ask=ask_iv")
    merged = ds.test.rows.assign(iv=ds.test.iv)
    np.testing.assert_allclose(merged["iv"], df.set_index(["quote_date", "expiry", "strike"]).loc[
        pd.MultiIndex.from_frame(merged[["quote_date", "expiry", "strike"]]), "true_iv"].to_numpy(), atol=1e-12)


def test_glob_of_files_with_the_date_in_the_name(make_cfg, tmp_path):
    df = make_chain(n_days=8)
    for d, g in df.groupby("quote_date"):
        g.drop(columns="quote_date").to_csv(tmp_path / f"chain_{d:%Y%m%d}.csv", index=False)
    ds = load(make_cfg, str(tmp_path / "chain_*.csv"), "data.quote_date_from_path='chain_([0-9]{8})'")
    assert ds.report["quote_dates"] == 8


def test_categorical_features_and_walk_forward(make_cfg, tmp_path):
    path = write(make_chain(n_days=16), tmp_path / "c.csv")
    ds = load(make_cfg, path, "data.cat_features=[option_type,expiry_cycle]")
    assert ds.cat_cardinalities == [3, 2]  # C/P and monthly only (both expiries are third Fridays), plus "unseen" and ds.train.x_cat.dtype.is_floating_point is False
    assert ds.train.x_cat.shape == (len(ds.train), 2) and int(ds.train.x_cat.min()) >= 1
    folds = [load(make_cfg, path, "data.n_folds=3", f"data.fold={i}") for i in range(3)]
    ends = [f.test.rows["quote_date"].max() for f in folds]
    assert ends[0] < ends[1] < ends[2]
    assert len(folds[0].train) < len(folds[1].train) < len(folds[2].train)


def test_synthetic_market_report_and_aux(make_cfg):
    ds = instantiate(make_cfg().data, _convert_="all")
    rep = ds.report
    assert rep["loaded"] > rep["quotes"] > 0 and rep["dropped"]["drop_zero_bid"] > 0
    assert json.loads(json.dumps(rep)) == rep  # logged to MLflow as data_report.json
    aux = ds.train.aux
    assert set(aux) >= {"log_moneyness", "tau", "base", "vega", "is_call", "quote_date_idx"}
    assert all(len(v) == len(ds.train) for v in aux.values())
    np.testing.assert_allclose(aux["base"].numpy(), ds.train.base, rtol=1e-6)
    assert (aux["vega"] > 0).all() and aux["quote_date_idx"].dtype == torch_int64()
    # The change target adds back onto the base exactly.
    level = ds.to_level(ds.test.y.numpy(), ds.test)
    np.testing.assert_allclose(level, ds.test.iv, atol=1e-6)


def torch_int64():
    import torch

    return torch.int64


def test_synthetic_jumps_steepen_the_short_dated_skew():
    from vforge.data.synthetic import generate_chain

    params = dict(seed=1, n_days=3, spot0=100.0, rate=0.0, dividend_yield=0.0,
                  heston=dict(kappa=2.0, theta=0.04, sigma=0.3, rho=-0.5, v0=0.04),
                  listing=dict(n_monthlies=2, n_weeklies=0, strike_step=5.0, moneyness_range=[0.8, 1.2]),
                  quotes=dict(half_spread_vol=0.0025, missing_fraction=0.0))

    def skew(intensity: float) -> float:
        ch = generate_chain(**params, jumps=dict(intensity=intensity, mean=-0.1, std=0.1))
        day = ch[(ch["quote_date"] == ch["quote_date"].min()) & (ch["option_type"] == "P")]
        first = day[day["expiry"] == day["expiry"].min()].set_index("strike")["model_iv"]
        return float(first.loc[90.0] - first.loc[100.0])

    # Same seed, same path shocks; Merton jumps with a negative mean fatten the left tail.
    assert skew(1.0) > skew(0.0) + 0.01


def test_itm_rows_take_the_otm_iv_of_their_strike(make_cfg, tmp_path):
    df = make_chain()
    first = df["quote_date"] == df["quote_date"].min()
    stale = df.index[first & (df["option_type"] == "C") & (df["strike"] == 80.0)]  # deep ITM call
    df.loc[stale, ["bid", "ask"]] = 1.0  # far below intrinsic (~20): not invertible on its own
    path = write(df, tmp_path / "c.csv")
    plain = load(make_cfg, path, "data.itm_from_otm=false")
    assert plain.report["dropped"]["drop_iv_price_at_or_below_intrinsic_value"] == len(stale)
    fixed = load(make_cfg, path, "data.itm_from_otm=true")
    assert fixed.report["dropped"].get("drop_iv_price_at_or_below_intrinsic_value", 0) == 0
    assert fixed.report["itm_iv_from_otm"] > len(stale)
    # Every row of a strike now carries one IV: calls and puts agree.
    rows = fixed.train.rows.assign(iv=fixed.train.iv)
    spread = rows.groupby(["quote_date", "expiry", "strike"])["iv"].agg(lambda s: s.max() - s.min())
    assert spread.max() < 1e-12
