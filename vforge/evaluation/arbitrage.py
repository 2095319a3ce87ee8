"""Static-arbitrage and consistency counts of a predicted IV surface, per quote date.

- **Calendar**: total implied variance ``w = iv^2 tau`` must not decrease with expiry at a fixed forward
  log-moneyness. Each quote of an expiry is compared with the next expiry's smile (same option type),
  interpolated linearly in log-moneyness inside that smile's range: a violation is ``w_later < w_earlier``.
- **Butterfly**: undiscounted Black prices must be convex in strike on one expiry (same option type). Each three
  consecutive strikes are one check: a violation is a slope that falls, ``(C3 - C2) / (K3 - K2) < (C2 - C1) /
  (K2 - K1)``.
- **Call/put gap**: put-call parity gives a call and a put with the same strike and expiry one implied volatility;
  the gap is ``|iv_call - iv_put|`` in vol points, averaged over those pairs.

Both arbitrage counts are shares of the checks that fail (0 for an arbitrage-free surface), so surfaces on
different rows (the model on every row, persistence on the previously quoted ones) compare; a small tolerance
keeps floating-point ties from counting.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vforge.data.iv import bs_price
from vforge.data.target import VOL_POINTS

W_TOL = 1e-7  # total variance (a 0.2 vol at one day is w ~ 1e-4)
PRICE_TOL = 1e-7  # in units of the forward


def butterfly(frame: pd.DataFrame, iv: str) -> pd.DataFrame:
    """Per date: ``butterfly_checks`` (strike triples) and ``butterfly_violations`` of column ``iv``: the middle
    price above the chord of its neighbours, in units of the forward."""
    f = frame[np.isfinite(frame[iv].to_numpy(np.float64))]
    f = f.sort_values(["target_date", "option_type", "expiry", "strike"])
    fwd, k, tau = (f[c].to_numpy(np.float64) for c in ("forward", "strike", "tau"))
    price = bs_price(fwd, k, tau, f[iv].to_numpy(np.float64), 0.0, (f["option_type"] == "C").to_numpy()) / fwd
    x = k / fwd
    group = f.groupby(["target_date", "option_type", "expiry"], sort=False).ngroup().to_numpy()
    same = (group[1:-1] == group[:-2]) & (group[1:-1] == group[2:])
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = (x[2:] - x[1:-1]) / (x[2:] - x[:-2])
    chord = lam * price[:-2] + (1.0 - lam) * price[2:]
    bad = same & (price[1:-1] > chord + PRICE_TOL)
    dates = f["target_date"].to_numpy()[1:-1]
    return pd.DataFrame({"date": dates[same], "bad": bad[same]}).groupby("date")["bad"].agg(
        butterfly_checks="size", butterfly_violations="sum")


def calendar(frame: pd.DataFrame, iv: str) -> pd.DataFrame:
    """Per date: ``calendar_checks`` (quotes compared with the previous expiry's smile) and ``calendar_violations``."""
    f = frame[np.isfinite(frame[iv].to_numpy(np.float64))]
    f = f.sort_values(["target_date", "option_type", "tau", "log_moneyness"])
    k, tau, vol = (f[c].to_numpy(np.float64) for c in ("log_moneyness", "tau", iv))
    w = vol * vol * tau
    out: dict = {}
    for (date, _), idx in f.groupby(["target_date", "option_type"], sort=False).indices.items():
        t = tau[idx]
        starts = np.flatnonzero(np.r_[True, np.diff(t) > 1e-9])
        bounds = np.r_[starts, len(idx)]
        checks = bad = 0
        for a0, a1, b1 in zip(bounds[:-2], bounds[1:-1], bounds[2:]):
            k_prev, w_prev = k[idx[a0:a1]], w[idx[a0:a1]]
            k_next, w_next = k[idx[a1:b1]], w[idx[a1:b1]]
            inside = (k_prev >= k_next[0]) & (k_prev <= k_next[-1])
            if len(k_next) < 2 or not inside.any():
                continue
            # The later smile at the earlier one's quotes: a chord lies above a convex smile, so interpolation
            # never invents a violation between two expiries that are close in time.
            later = np.interp(k_prev[inside], k_next, w_next)
            checks += int(inside.sum())
            bad += int((later < w_prev[inside] - W_TOL).sum())
        c, b = out.get(date, (0, 0))
        out[date] = (c + checks, b + bad)
    table = pd.DataFrame.from_dict(out, orient="index", columns=["calendar_checks", "calendar_violations"])
    return table.rename_axis("date")


def call_put_gap(frame: pd.DataFrame, iv: str) -> pd.DataFrame:
    """Per date: ``cp_pairs`` (strikes and expiries with both a call and a put) and ``cp_gap_vol_pts`` (mean gap)."""
    f = frame[np.isfinite(frame[iv].to_numpy(np.float64))]
    key = ["target_date", "expiry", "strike"]
    calls = f.loc[f["option_type"] == "C", key + [iv]]
    puts = f.loc[f["option_type"] == "P", key + [iv]]
    pairs = calls.merge(puts, on=key, suffixes=("_c", "_p"))
    gap = (pairs[f"{iv}_c"] - pairs[f"{iv}_p"]).abs() * VOL_POINTS
    return gap.groupby(pairs["target_date"].rename("date")).agg(cp_pairs="size", cp_gap_vol_pts="mean")


def per_date(frame: pd.DataFrame, iv: str) -> pd.DataFrame:
    """Calendar, butterfly and call/put counts of column ``iv`` per target date."""
    return pd.concat([calendar(frame, iv), butterfly(frame, iv), call_put_gap(frame, iv)], axis=1)


def summary(table: pd.DataFrame) -> dict[str, float]:
    """Pooled over dates: ``arb_calendar`` and ``arb_butterfly`` (share of checks failing), ``cp_gap_vol_pts``."""
    share = lambda bad, n: float(table[bad].sum() / table[n].sum()) if table[n].sum() else float("nan")  # noqa: E731
    pairs = table["cp_pairs"].fillna(0)
    gap = float((table["cp_gap_vol_pts"].fillna(0) * pairs).sum() / pairs.sum()) if pairs.sum() else float("nan")
    return {"arb_calendar": share("calendar_violations", "calendar_checks"),
            "arb_butterfly": share("butterfly_violations", "butterfly_checks"), "cp_gap_vol_pts": gap}
