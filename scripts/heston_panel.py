"""A panel nobody tuned on: a Heston market priced by QuantLib, written as a chain table for ``data=chain``.

The issue-10 goals are checked on held-back panels, one of them QuantLib-priced Heston over 500 dates. vforge's own
markets (``vforge/data/synthetic.py``, ``messy.py``) were looked at while its defaults were chosen, so this script
makes a market from other code: the spot and variance follow Heston under a real-world drift (full-truncation
Euler, ``SUBSTEPS`` steps a calendar day), each NYSE business day's listed calls and puts are priced by QuantLib's
``AnalyticHestonEngine`` at that day's variance, and the quotes are bid/ask prices on a 0.01 tick around a noisy
mid (no implied-volatility column: the loader inverts the mid, and its quote filters apply as to any chain). Its
parameters were fixed before any vforge run on it; the panel goes to the cache folder, never to the repository.

    python scripts/heston_panel.py --variant 1                   # -> <cache>/heston_panel/variant1.csv
    python -m vforge.train data=chain data.path=<that file> logger=none

``VARIANTS`` are three markets (their seeds are their numbers); ``scripts/accuracy.py suite --groups heston`` runs
the default command on each as held-out panels (reported, never tuned on).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import QuantLib as ql
from omegaconf import OmegaConf


@dataclass(frozen=True)
class Market:
    kappa: float = 1.5          # risk-neutral mean reversion of the variance
    theta: float = 0.05         # its long-run level (22% vol)
    sigma: float = 0.5          # vol of variance
    rho: float = -0.7           # spot/variance correlation
    v0: float = 0.04
    kappa_p: float = 3.0        # real-world mean reversion (a variance risk premium: faster and lower than Q)
    theta_p: float = 0.035
    mu: float = 0.06            # real-world drift of the spot
    spot: float = 100.0
    rate: float = 0.02
    dividend: float = 0.01
    tick: float = 0.01
    half_spread: float = 0.02   # half the bid/ask spread as a share of the price (at least one tick)
    mid_noise: float = 0.25     # noise of the quoted mid as a share of the half spread


# Fixed before any vforge run on them. 1: a variance risk premium (variance reverts faster and lower under the
# real-world measure than priced); 2: no premium, no drift, high vol of vol, wide and noisy quotes; 3: a calm,
# steeply skewed market whose variance drifts up under the real-world measure, in a rally.
VARIANTS: dict[int, dict[str, float]] = {
    1: {},
    2: dict(kappa_p=1.5, theta_p=0.05, mu=0.0, sigma=0.8, rho=-0.5, half_spread=0.04, mid_noise=0.5),
    3: dict(kappa=4.0, theta=0.02, sigma=0.3, rho=-0.85, v0=0.02, kappa_p=2.0, theta_p=0.03, mu=0.10,
            half_spread=0.01),
}
SUBSTEPS = 8
START = ql.Date(3, 1, 2022)


def quote_dates(n: int) -> list[ql.Date]:
    calendar = ql.UnitedStates(ql.UnitedStates.NYSE)
    dates, day = [], START
    while len(dates) < n:
        if calendar.isBusinessDay(day):
            dates.append(day)
        day = day + 1
    return dates


def paths(market: Market, dates: list[ql.Date], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Spot and variance on each quote date: Heston under the real-world measure (drift ``mu``, variance reverting
    at ``kappa_p`` to ``theta_p``), full-truncation Euler over calendar time."""
    spot, var = np.empty(len(dates)), np.empty(len(dates))
    s, v = market.spot, market.v0
    spot[0], var[0] = s, v
    for i in range(1, len(dates)):
        dt = (dates[i] - dates[i - 1]) / 365.0 / SUBSTEPS
        for _ in range(SUBSTEPS):
            z1, z2 = rng.standard_normal(2)
            zv = market.rho * z1 + np.sqrt(1 - market.rho ** 2) * z2
            vp = max(v, 0.0)
            s *= np.exp((market.mu - market.dividend - 0.5 * vp) * dt + np.sqrt(vp * dt) * z1)
            v += market.kappa_p * (market.theta_p - vp) * dt + market.sigma * np.sqrt(vp * dt) * zv
        spot[i], var[i] = s, max(v, 1e-4)
    return spot, var


def expiries(day: ql.Date) -> list[ql.Date]:
    """Listed expiries: the third Friday of the next six months and of the quarter months up to a year out."""
    out = []
    for ahead in range(0, 13):
        month = (day.month() - 1 + ahead) % 12 + 1
        year = day.year() + (day.month() - 1 + ahead) // 12
        expiry = ql.Date.nthWeekday(3, ql.Friday, month, year)
        if expiry > day and (ahead <= 6 or month in (3, 6, 9, 12)):
            out.append(expiry)
    return out


def strikes(spot: float, tau: float) -> np.ndarray:
    """Listed strikes in steps of 1 (2.5 beyond 20% from the spot), quoted within 2.5 standard deviations."""
    width = max(2.5 * 0.25 * np.sqrt(tau), 0.05)
    lo, hi = spot * np.exp(-width), spot * np.exp(width)
    fine = np.arange(np.ceil(max(lo, 0.8 * spot)), np.floor(min(hi, 1.2 * spot)) + 1, 1.0)
    coarse = np.arange(np.ceil(lo / 2.5) * 2.5, np.floor(hi / 2.5) * 2.5 + 2.5, 2.5)
    coarse = coarse[(coarse < 0.8 * spot) | (coarse > 1.2 * spot)]
    return np.unique(np.concatenate([fine, coarse]))


def model_prices(market: Market, day: ql.Date, spot: float, var: float) -> pd.DataFrame:
    """Every listed call and put of ``day`` priced by QuantLib's ``AnalyticHestonEngine`` at variance ``var``."""
    ql.Settings.instance().evaluationDate = day
    count = ql.Actual365Fixed()
    rate = ql.YieldTermStructureHandle(ql.FlatForward(day, market.rate, count))
    dividend = ql.YieldTermStructureHandle(ql.FlatForward(day, market.dividend, count))
    process = ql.HestonProcess(rate, dividend, ql.QuoteHandle(ql.SimpleQuote(spot)), var, market.kappa,
                               market.theta, market.sigma, market.rho)
    engine = ql.AnalyticHestonEngine(ql.HestonModel(process))
    rows = []
    for expiry in expiries(day):
        tau = (expiry - day) / 365.0
        for strike in strikes(spot, tau):
            for kind, name in ((ql.Option.Call, "C"), (ql.Option.Put, "P")):
                option = ql.VanillaOption(ql.PlainVanillaPayoff(kind, float(strike)), ql.EuropeanExercise(expiry))
                option.setPricingEngine(engine)
                rows.append((expiry.ISO(), float(strike), name, option.NPV()))
    return pd.DataFrame(rows, columns=["expiry", "strike", "option_type", "model_price"])


def day_quotes(market: Market, day: ql.Date, spot: float, var: float, rng: np.random.Generator) -> pd.DataFrame:
    """The day's quotes: bid and ask on the tick around the model price plus noise (the bid at least 0, the ask at
    least a tick, as an exchange shows them)."""
    frame = model_prices(market, day, spot, var)
    half = np.maximum(market.half_spread * frame["model_price"], market.tick)
    mid = frame["model_price"] + market.mid_noise * half * rng.standard_normal(len(frame))
    frame["bid"] = np.maximum(np.floor((mid - half) / market.tick) * market.tick, 0.0).round(10)
    frame["ask"] = np.maximum(np.ceil((mid + half) / market.tick) * market.tick, market.tick).round(10)
    frame.insert(0, "quote_date", day.ISO())
    frame["underlying_price"] = round(spot, 4)
    frame["rate"], frame["dividend_yield"] = market.rate, market.dividend
    frame["variance"] = var
    return frame


TRUTH = ["model_price", "variance"]  # what the market knows and the quotes do not show (``truth=True``)


def panel(n_dates: int, seed: int, market: Market = Market(), truth: bool = False) -> pd.DataFrame:
    """The chain table; with ``truth`` also each quote's noise-free model price and the day's variance (``TRUTH``),
    the same table otherwise (one random stream)."""
    rng = np.random.default_rng(seed)
    dates = quote_dates(n_dates)
    spot, var = paths(market, dates, rng)
    frame = pd.concat([day_quotes(market, d, s, v, rng) for d, s, v in zip(dates, spot, var)], ignore_index=True)
    return frame if truth else frame.drop(columns=TRUTH)


def write(variant: int, out: Path, changes: dict[str, float] | None = None, n_dates: int = 500,
          truth: bool = False) -> Path:
    """The panel of ``VARIANTS[variant]`` (seed ``variant``) with ``changes`` on top, written once under ``out``;
    with ``truth`` also ``truth_path(path)``: its keys with ``TRUTH`` (for ``scripts/ceiling.py``; never a feature)."""
    changes = {**VARIANTS[variant], **(changes or {})}
    extra = {k: v for k, v in changes.items() if VARIANTS[variant].get(k) != v}
    path = out / ("_".join([f"variant{variant}", *(f"{k}{v:g}" for k, v in sorted(extra.items()))]) + ".csv")
    if not path.exists() or (truth and not truth_path(path).exists()):
        out.mkdir(parents=True, exist_ok=True)
        frame = panel(n_dates, variant, Market(**changes), truth=True)
        frame.drop(columns=TRUTH).to_csv(path, index=False)
        frame[["quote_date", "expiry", "strike", "option_type", *TRUTH]].to_parquet(truth_path(path), index=False)
    return path


def truth_path(path: Path) -> Path:
    return path.with_suffix(".truth.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dates", type=int, default=500)
    parser.add_argument("--variant", type=int, default=1, choices=list(VARIANTS))
    cache = Path(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "data" / "chain.yaml").cache_dir)
    parser.add_argument("--out", type=Path, default=cache / "heston_panel")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="market parameters other than the defaults, e.g. --set kappa_p=1.5 theta_p=0.05")
    args = parser.parse_args()
    changes = {k: float(v) for k, v in (item.split("=", 1) for item in args.set)}
    unknown = set(changes) - set(Market.__dataclass_fields__)
    if unknown:
        parser.error(f"unknown market field(s) {sorted(unknown)}; known: {sorted(Market.__dataclass_fields__)}")
    print(write(args.variant, args.out, changes, args.dates))


if __name__ == "__main__":
    main()
