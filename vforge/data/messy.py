"""A synthetic market that misbehaves the way real chains do (``data=synthetic_messy``).

Built from the embedded market's parts (``vforge.data.synthetic``): a Heston path that runs through regimes with
their own parameters and real-world drift (so the drift learnt on the training dates is wrong on the test dates),
volatility jumps, quote dates missing (holidays, whole weeks), an underlying stamped at another moment than the
option quotes on some dates (short-dated quotes then invert to absurd IVs), junk quotes (zero bids, stale prices,
prices far above any plausible IV), wide wing spreads and a calls-only variant. The table goes through the same
loader checks and quote filters as a chain file (``vforge.data.chain.normalize``), so every junk quote is either
filtered and counted in the data report or reaches the model visibly.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pandas as pd

from vforge.data import synthetic as S
from vforge.data.chain import ChainOptions, build_dataset
from vforge.data.dataset import Dataset


def simulate_regimes(*, n_days: int, spot0: float, rate: float, dividend_yield: float, regimes: list[dict],
                     vol_jumps: list[list[float]], jumps: dict, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Daily spot, variance and regime index over ``n_days`` business days.

    Args:
        regimes: each ``{until, drift, heston: {kappa, theta, sigma, rho}}``; ``until`` is the fraction of the path
            where the regime ends (the last one runs to the end); ``drift`` the spot's annual real-world drift.
        vol_jumps: ``[fraction, factor]`` pairs: on that day the variance is multiplied by ``factor`` (with a spot
            move of one day's standard deviation times ``-sign(log factor)``: vol up, spot down).
    """
    ends = [min(n_days, int(round(r["until"] * n_days))) for r in regimes[:-1]] + [n_days]
    jump_at = {max(1, int(round(f * n_days))): float(x) for f, x in vol_jumps}
    cuts = sorted({0, *ends, *jump_at})
    spot, var, regime = np.empty(n_days), np.empty(n_days), np.empty(n_days, dtype=np.int64)
    s, v = spot0, float(regimes[0]["heston"]["theta"])
    for a, b in zip(cuts[:-1], cuts[1:]):
        r = next(i for i, e in enumerate(ends) if a < e)
        if a in jump_at:
            factor = jump_at[a]
            s *= np.exp(-np.sign(np.log(factor)) * np.sqrt(v / S.TRADING_DAYS))
            v *= factor
        heston = {**regimes[r]["heston"], "v0": v}
        path_s, path_v = S.simulate_path(n_days=b - a + 1, spot0=s, rate=rate, dividend_yield=dividend_yield,
                                         heston=heston, jumps=jumps, rng=rng, drift=regimes[r]["drift"])
        spot[a:b], var[a:b], regime[a:b] = path_s[1:], path_v[1:], r
        s, v = path_s[-1], path_v[-1]
    return spot, var, regime


def missing_dates(n_days: int, *, holiday_fraction: float, missing_weeks: list[list[float]],
                  rng: np.random.Generator) -> np.ndarray:
    """Boolean (n_days,) of business days with no quotes: random single holidays, and blocks
    ``[fraction, n_business_days]`` (a missing week or two). The first and last dates are always quoted."""
    gone = rng.random(n_days) < holiday_fraction
    for f, length in missing_weeks:
        start = int(round(f * n_days))
        gone[start : start + int(length)] = True
    gone[0] = gone[-1] = False
    return gone


def generate_messy_chain(*, seed: int, n_days: int, spot0: float, rate: float, dividend_yield: float,
                         regimes: list[dict], vol_jumps: list[list[float]], jumps: dict, gaps: dict,
                         spot_stamp: dict, junk: dict, listing: dict, quotes: dict, calls_only: bool) -> pd.DataFrame:
    """One canonical chain table of the messy market (columns as ``synthetic.generate_chain``, plus ``regime``)."""
    rng = np.random.default_rng(seed)
    spot, var, regime = simulate_regimes(n_days=n_days, spot0=spot0, rate=rate, dividend_yield=dividend_yield,
                                         regimes=regimes, vol_jumps=vol_jumps, jumps=jumps, rng=rng)
    dates = pd.bdate_range(S.START_DATE, periods=n_days)
    keep = ~missing_dates(n_days, holiday_fraction=gaps["holiday_fraction"], missing_weeks=gaps["missing_weeks"],
                          rng=rng)
    expiries = S.listed_expiries(dates, listing["n_monthlies"], listing["n_weeklies"])
    frames = []
    for r, params in enumerate(regimes):  # each regime's days priced under its own parameters
        sel = keep & (regime == r)
        if sel.any():
            frames.append(S.quote_chain(dates[sel], spot[sel], var[sel], rate=rate, dividend_yield=dividend_yield,
                                        heston=params["heston"], jumps=jumps, listing=listing, quotes=quotes,
                                        expiries=expiries).assign(regime=r))
    chain = pd.concat(frames, ignore_index=True).sort_values(["quote_date", "expiry", "strike", "option_type"])
    chain = chain.reset_index(drop=True)
    chain = chain[rng.random(len(chain)) >= quotes["missing_fraction"]].reset_index(drop=True)

    # The underlying stamped at another moment than the options on some dates: off by a fraction of a day's move.
    qd = chain["quote_date"].to_numpy()
    udates = np.unique(qd)
    stale = rng.random(len(udates)) < spot_stamp["date_fraction"]
    day_sd = np.sqrt(var[np.searchsorted(dates.to_numpy(), udates)] * spot_stamp["lag_days"] / S.TRADING_DAYS)
    shift = np.where(stale, np.exp(day_sd * rng.standard_normal(len(udates))), 1.0)
    chain["underlying_price"] *= shift[np.searchsorted(udates, qd)]

    # Junk quotes: a stale price (the contract's quote of the previous date, if any), a zero bid, an absurd ask.
    n = len(chain)
    kind = rng.choice(4, size=n, p=[1 - sum(junk.values()), junk["stale"], junk["zero_bid"], junk["absurd"]])
    key = ["expiry", "strike", "option_type"]
    prev = chain.groupby(key, sort=False)[["bid", "ask"]].shift(1)
    take = (kind == 1) & prev["bid"].notna().to_numpy()
    chain.loc[take, ["bid", "ask"]] = prev.loc[take, ["bid", "ask"]].to_numpy()
    chain.loc[kind == 2, "bid"] = 0.0
    absurd = kind == 3
    chain.loc[absurd, "ask"] = chain.loc[absurd, "ask"] * 3 + 0.02 * chain.loc[absurd, "underlying_price"]
    if calls_only:
        chain = chain[chain["option_type"] == "C"].reset_index(drop=True)
    return chain.drop(columns=["rate", "dividend_yield"])  # like most real tables: the loader's defaults fill them


def load(*, seed: int, n_days: int, spot0: float, rate: float, dividend_yield: float, regimes: list[dict],
         vol_jumps: list[list[float]], jumps: dict, gaps: dict, spot_stamp: dict, junk: dict, listing: dict,
         quotes: dict, calls_only: bool, cache_dir: str | None, **options: Any) -> Dataset:
    """The messy market as a ``Dataset``, through the chain loader's checks and quote filters.

    ``options``: the keys of ``conf/data/chain.yaml`` (the preset inherits them); those that say how to read a
    file (``path``, ``columns``, ``read_options``, ``quote_date_from_path``, ``iv_unit``, ``chunk_rows``: the
    market is generated in memory) do not apply.
    """
    for key in ("path", "columns", "read_options", "quote_date_from_path", "iv_unit", "chunk_rows"):
        options.pop(key, None)
    params = dict(seed=seed, n_days=n_days, spot0=spot0, rate=rate, dividend_yield=dividend_yield,
                  regimes=[dict(r, heston=dict(r["heston"])) for r in regimes], vol_jumps=[list(v) for v in vol_jumps],
                  jumps=dict(jumps), gaps=dict(gaps, missing_weeks=[list(w) for w in gaps["missing_weeks"]]),
                  spot_stamp=dict(spot_stamp), junk=dict(junk), listing=dict(listing), quotes=dict(quotes),
                  calls_only=calls_only)
    raw = S.cached_chain(cache_dir, generate=generate_messy_chain, name="messy", modules=(sys.modules[__name__],),
                         **params)
    chain_options, pipeline = ChainOptions.pick({**options, "rate": rate, "dividend_yield": dividend_yield})
    source = "synthetic_messy" + (" (calls only)" if calls_only else "")
    return build_dataset(raw.drop(columns=["model_iv", "regime"]), source=source, options=chain_options, **pipeline)
