"""Named features. Each documents the information it uses and as of when.

Notation: a row is a contract on its *terms date* ``j`` (contract terms and spot known),
predicting the IV at ``j + horizon`` quote dates. Surface information (IVs) comes from the
*info date*: ``j - 1`` when ``horizon == 0`` (re-marking today's surface from yesterday's),
``j`` otherwise. "Previous" below means the info date: the latest date present in the data
before the target, never a later one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# name -> one-line description (information used, as of when)
FEATURES: dict[str, str] = {
    "log_moneyness": "log(K / F) with F from the terms-date spot, rate and dividend yield",
    "tau": "years to expiry at the target date (contract terms, known in advance)",
    "sqrt_tau": "square root of tau",
    "is_call": "1 for calls, 0 for puts",
    "prev_iv": "the contract's own IV on the info date (filled with the previous surface where missing)",
    "prev_iv_missing": "1 where the contract was not quoted on the info date",
    "gap_days": "calendar days from the info date to the target date",
    "spot_ret_1d": "log spot return over the last quote date up to the terms date",
    "spot_ret_5d": "log spot return over the last 5 quote dates up to the terms date",
    "realized_vol_21d": "annualized realized vol of daily log returns over 21 quote dates up to the terms date",
    "prev_atm_iv": "the info date's ATM IV interpolated to 30 days",
}


def validate_names(names: list[str]) -> None:
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise ValueError(f"unknown feature(s) {unknown} in data.features; valid names: {', '.join(FEATURES)}")


def market_state(spot: pd.Series) -> pd.DataFrame:
    """Spot-path features per quote date, using spot up to and including that date.

    Args:
        spot: underlying price indexed by quote date (sorted).
    """
    logs = np.log(spot)
    ret = logs.diff()
    return pd.DataFrame({
        "spot_ret_1d": ret.fillna(0.0),
        "spot_ret_5d": (logs - logs.shift(5)).fillna(0.0),
        "realized_vol_21d": ret.rolling(21, min_periods=2).std().bfill().fillna(0.0) * np.sqrt(252),
    })


def atm_iv_30d(day: pd.DataFrame) -> float:
    """ATM IV at 30 days from one quote date's surface (rows with log_moneyness, tau, iv)."""
    per_exp = day.assign(absk=day["log_moneyness"].abs()).sort_values("absk").groupby("tau")["iv"].first()
    taus, ivs = per_exp.index.to_numpy(), per_exp.to_numpy()
    target = 30 / 365
    if len(taus) == 1:
        return float(ivs[0])
    # interpolate total variance linearly in tau, flat extrapolation in vol
    w = np.interp(target, taus, ivs**2 * taus)
    if target < taus[0]:
        return float(ivs[0])
    if target > taus[-1]:
        return float(ivs[-1])
    return float(np.sqrt(w / target))
