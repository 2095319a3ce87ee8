"""The embedded synthetic market: a simulated Heston/Bates path, listed options, bid/ask quotes.

Everything is generated from a seed in a few seconds and cached by a hash of the parameters,
so every run of the default config trains on exactly the same chain.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vforge.data.chain import ChainOptions, build_dataset
from vforge.data.dataset import Dataset
from vforge.data.heston import heston_price
from vforge.data.iv import bs_price, implied_vol

TRADING_DAYS = 252
GENERATOR_VERSION = 2  # part of the cache key: bump when the generator's output changes
START_DATE = "2024-01-02"


def simulate_path(*, n_days: int, spot0: float, rate: float, dividend_yield: float, heston: dict, jumps: dict,
                  rng: np.random.Generator, substeps: int = 8, drift: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Daily spot and variance of a Heston (+ Merton jumps) path, full-truncation Euler.

    ``drift``: the spot's real-world drift (annual, of the price); ``rate - dividend_yield`` (risk neutral) by default.
    Returns ``spot, variance``, each of shape (n_days,); index 0 is the start.
    """
    kappa, theta, sigma, rho, v0 = (heston[k] for k in ("kappa", "theta", "sigma", "rho", "v0"))
    lam, mu_j, sd_j = jumps["intensity"], jumps["mean"], jumps["std"]
    dt = 1.0 / TRADING_DAYS / substeps
    jump_comp = np.exp(mu_j + 0.5 * sd_j**2) - 1.0
    mu = rate - dividend_yield if drift is None else drift
    log_s, v = np.log(spot0), v0
    spot, var = np.empty(n_days), np.empty(n_days)
    spot[0], var[0] = spot0, v0
    z = rng.standard_normal((n_days, substeps, 2))
    n_jumps = rng.poisson(lam * dt * substeps, size=n_days)
    for day in range(1, n_days):
        for j in range(substeps):
            vp = max(v, 0.0)
            z1 = z[day, j, 0]
            z2 = rho * z1 + np.sqrt(1 - rho * rho) * z[day, j, 1]
            log_s += (mu - lam * jump_comp - 0.5 * vp) * dt + np.sqrt(vp * dt) * z1
            v += kappa * (theta - vp) * dt + sigma * np.sqrt(vp * dt) * z2
        if n_jumps[day]:
            log_s += rng.normal(mu_j * n_jumps[day], sd_j * np.sqrt(n_jumps[day]))
        spot[day], var[day] = np.exp(log_s), max(v, 1e-6)
    return spot, var


def listed_expiries(dates: pd.DatetimeIndex, n_monthlies: int, n_weeklies: int) -> pd.DatetimeIndex:
    """Third-Friday monthlies and plain-Friday weeklies covering the simulated window."""
    months = pd.date_range(dates[0] - pd.offsets.MonthBegin(1), dates[-1] + pd.DateOffset(months=n_monthlies + 1), freq="MS")
    third_fridays = months + pd.to_timedelta((4 - months.weekday) % 7 + 14, unit="D")
    fridays = pd.date_range(dates[0], dates[-1] + pd.Timedelta(weeks=n_weeklies + 1), freq="W-FRI")
    return third_fridays.union(fridays).unique().sort_values()


def generate_chain(*, seed: int, n_days: int, spot0: float, rate: float, dividend_yield: float, heston: dict,
                   jumps: dict, listing: dict, quotes: dict) -> pd.DataFrame:
    """One canonical option-chain table (see DESIGN.md) for the simulated market."""
    rng = np.random.default_rng(seed)
    spot, var = simulate_path(n_days=n_days, spot0=spot0, rate=rate, dividend_yield=dividend_yield,
                              heston=heston, jumps=jumps, rng=rng)
    dates = pd.bdate_range(START_DATE, periods=n_days)
    chain = quote_chain(dates, spot, var, rate=rate, dividend_yield=dividend_yield, heston=heston, jumps=jumps,
                        listing=listing, quotes=quotes)
    present = rng.random(len(chain)) >= quotes["missing_fraction"]
    return chain[present].reset_index(drop=True)


def quote_chain(dates: pd.DatetimeIndex, spot: np.ndarray, var: np.ndarray, *, rate: float, dividend_yield: float,
                heston: dict, jumps: dict, listing: dict, quotes: dict,
                expiries: pd.DatetimeIndex | None = None) -> pd.DataFrame:
    """Listed options of every date priced under Heston/Bates at that date's spot and variance, with bid/ask quotes.

    ``expiries``: the listed expiry calendar (by default the one covering ``dates``); ``quotes.wing_spread``
    (default 1) scales how fast the spread widens away from the money.
    """
    expiries = listed_expiries(dates, listing["n_monthlies"], listing["n_weeklies"]) if expiries is None else expiries
    third_friday = (expiries.day >= 15) & (expiries.day <= 21)
    step = listing["strike_step"]
    lo_m, hi_m = listing["moneyness_range"]

    frames = []
    for i, date in enumerate(dates):
        days_left = (expiries - date).days
        weekly_ok = (days_left > 0) & (days_left <= 7 * listing["n_weeklies"])
        monthly_ok = third_friday & (days_left > 0) & (days_left <= 31 * listing["n_monthlies"])
        exp_today = expiries[weekly_ok | monthly_ok]
        strikes = np.arange(np.ceil(spot[i] * lo_m / step), np.floor(spot[i] * hi_m / step) + 1) * step
        e, k, c = np.meshgrid(np.arange(len(exp_today)), strikes, [1, 0], indexing="ij")
        frames.append(pd.DataFrame({
            "quote_date": date, "expiry": exp_today[e.ravel()], "strike": k.ravel(),
            "is_call": c.ravel().astype(bool), "underlying_price": spot[i], "_var": var[i],
        }))
    chain = pd.concat(frames, ignore_index=True)
    tau = (chain["expiry"] - chain["quote_date"]).dt.days.to_numpy() / 365.0
    s, k, call = chain["underlying_price"].to_numpy(), chain["strike"].to_numpy(), chain["is_call"].to_numpy()
    price = heston_price(s, k, tau, rate, dividend_yield, call, v0=chain["_var"].to_numpy(), **_heston_args(heston, jumps))
    fwd = s * np.exp((rate - dividend_yield) * tau)
    model_iv, _ = implied_vol(price, fwd, k, tau, rate, call)

    # Quotes: a half-spread in vol that widens for short expiries and far from the money,
    # bid/ask priced from it and rounded to a one-cent tick.
    log_m = np.abs(np.log(k / fwd)) / np.sqrt(np.maximum(tau, 1 / 365))
    half = quotes["half_spread_vol"] * (1.0 + 0.5 / np.sqrt(tau * 52.0)) * (1.0 + quotes.get("wing_spread", 1.0) * log_m**2)
    bid = np.floor(bs_price(fwd, k, tau, np.maximum(model_iv - half, 1e-4), rate, call) * 100) / 100
    ask = np.ceil(bs_price(fwd, k, tau, model_iv + half, rate, call) * 100) / 100
    bid = np.maximum(bid, 0.0)

    # Every listed quote is published, zero bids and all: the loader's checks drop and count the
    # unusable ones, as they do on real chains. IVs are inverted from the mid there.
    return chain.drop(columns="_var").assign(
        option_type=np.where(call, "C", "P"), bid=bid, ask=ask, model_iv=model_iv,
        rate=rate, dividend_yield=dividend_yield,
    ).drop(columns="is_call")


def _heston_args(heston: dict, jumps: dict) -> dict:
    return dict(kappa=heston["kappa"], theta=heston["theta"], sigma=heston["sigma"], rho=heston["rho"],
                jump_intensity=jumps["intensity"], jump_mean=jumps["mean"], jump_std=jumps["std"])


def generator_digest(*modules: Any) -> str:
    """A hash of the generator's source (this module, the pricer, the IV inverter and ``modules``): part of the
    cache key, so a changed generator never reads a file its previous version wrote."""
    import inspect
    import sys

    from vforge.data import heston, iv

    names = sorted({__name__, heston.__name__, iv.__name__, *(m.__name__ for m in modules)})
    return hashlib.sha256("".join(inspect.getsource(sys.modules[n]) for n in names).encode()).hexdigest()[:16]


def cached_chain(cache_dir: str | Path | None, *, generate: Callable[..., pd.DataFrame] | None = None,
                 name: str = "synthetic", modules: tuple[Any, ...] = (), **params: Any) -> pd.DataFrame:
    """``generate(**params)`` (default ``generate_chain``), cached as Parquet under ``cache_dir`` by a hash of the
    parameters, ``GENERATOR_VERSION`` and the generator's source (``generator_digest(*modules)``)."""
    generate = generate or generate_chain
    if cache_dir is None:
        return generate(**params)
    blob = json.dumps({**params, "version": GENERATOR_VERSION, "source": generator_digest(*modules)},
                      sort_keys=True, default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{name}-{key}.parquet"
    if path.exists():
        return pd.read_parquet(path)
    chain = generate(**params)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
    chain.to_parquet(tmp, index=False)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return chain


def generated(*, seed: int, n_days: int, spot0: float, rate: float, dividend_yield: float, heston: Mapping,
              jumps: Mapping, listing: Mapping, quotes: Mapping, cache_dir: str | None, **_: Any) -> pd.DataFrame:
    """The generated chain of a ``data=synthetic`` config (its keys; the others are ignored), the simulator's
    ``model_iv`` included, from the cache ``load`` reads: ``generated(**cfg.data)``."""
    return cached_chain(cache_dir, seed=seed, n_days=n_days, spot0=spot0, rate=rate, dividend_yield=dividend_yield,
                        heston=dict(heston), jumps=dict(jumps), listing=dict(listing), quotes=dict(quotes))


def load(*, seed: int, n_days: int, spot0: float, rate: float, dividend_yield: float, heston: dict, jumps: dict,
         listing: dict, quotes: dict, cache_dir: str | None, **options: Any) -> Dataset:
    """The synthetic market as a ready-to-train ``Dataset``, through the same checks as a chain file.

    ``options``: quote filters (``ChainOptions``) and the pipeline keys of ``dataset.prepare``.
    """
    raw = generated(seed=seed, n_days=n_days, spot0=spot0, rate=rate, dividend_yield=dividend_yield, heston=heston,
                    jumps=jumps, listing=listing, quotes=quotes, cache_dir=cache_dir)
    chain_options, pipeline = ChainOptions.pick({**options, "rate": rate, "dividend_yield": dividend_yield})
    return build_dataset(raw, source="synthetic", options=chain_options, **pipeline)
