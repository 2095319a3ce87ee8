"""Is the model better than what the desk has? A Diebold-Mariano test on per-date losses, and the share of dates won.

Diebold & Mariano 1995 (https://doi.org/10.1080/07350015.1995.10524599) with the small-sample correction of
Harvey, Leybourne & Newbold 1997 (https://doi.org/10.1016/S0169-2070(96)00719-4). What is chosen here and why:

- **Loss differential per quote date.** ``d_t`` is the mean over the rows of date ``t`` of the model's squared error
  minus the benchmark's, on the same rows. The rows of one surface are not independent draws (one volatility move
  shifts them all), so the date is the unit of observation; a row-level test would count one surface as hundreds of
  independent errors and declare almost anything significant.
- **Newey-West variance** of the mean of ``d_t``: Bartlett weights up to ``floor(T^(1/3))`` lags, because the errors
  of neighbouring dates are correlated through the volatility regime even for one-step re-marks.
- **HLN correction** of the statistic for an ``h``-step forecast, ``sqrt((T + 1 - 2h + h(h - 1) / T) / T)``, with
  ``h = data.horizon + 1`` quote dates, and Student-t quantiles with ``T - 1`` degrees of freedom: on the 10 to 40
  dates a validation or test block holds, the normal approximation rejects too often.
- **One-sided p-value** for "the model's loss is lower": small when the model beats the benchmark, near 1 when the
  benchmark beats the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import stdtr  # Student t CDF; scipy.stats costs ~1 s to import

from vforge.data.target import VOL_POINTS


@dataclass(frozen=True)
class DMResult:
    """``stat`` < 0 means the model's loss is lower; ``pvalue`` is one-sided (model better); ``n_dates`` = T."""

    stat: float
    pvalue: float
    n_dates: int
    mean_diff: float  # mean loss differential, squared vol points


NAN_DM = DMResult(math.nan, math.nan, 0, math.nan)


def newey_west_lags(n: int) -> int:
    return int(math.floor(n ** (1.0 / 3.0)))


def diebold_mariano(loss_model: np.ndarray, loss_bench: np.ndarray, *, horizon: int = 1,
                    lags: int | None = None) -> DMResult:
    """DM test of equal loss with Newey-West variance and the HLN correction (see the module docstring).

    Shape:
        loss_model, loss_bench: (T,) a loss per date (e.g. mean squared error of that date's rows)

    Args:
        horizon: forecast steps ``h`` (1 for a re-mark from yesterday's surface).
        lags: Newey-West lags; default ``floor(T^(1/3))``.

    NaN when there are fewer than 3 dates or the differential has no variance; a model whose losses equal the
    benchmark's on every date (e.g. the do-no-harm step fell back to persistence) is no evidence either way:
    statistic 0, p-value 0.5.
    """
    d = np.asarray(loss_model, dtype=np.float64) - np.asarray(loss_bench, dtype=np.float64)
    d = d[np.isfinite(d)]
    n = len(d)
    if n < 3:
        return DMResult(math.nan, math.nan, n, float(d.mean()) if n else math.nan)
    if not np.any(d):
        return DMResult(0.0, 0.5, n, 0.0)
    lags = newey_west_lags(n) if lags is None else min(lags, n - 1)
    dbar = float(d.mean())
    c = d - dbar
    lrv = float(c @ c) / n
    for k in range(1, lags + 1):
        lrv += 2.0 * (1.0 - k / (lags + 1.0)) * float(c[k:] @ c[:-k]) / n
    if not lrv > 0:
        return DMResult(math.nan, math.nan, n, dbar)
    dm = dbar / math.sqrt(lrv / n)
    h = max(int(horizon), 1)
    dm *= math.sqrt(max(n + 1 - 2 * h + h * (h - 1) / n, 0.0) / n)
    return DMResult(dm, float(stdtr(n - 1, dm)), n, dbar)


def per_date_sq_errors(dates: np.ndarray, pred: np.ndarray, bench: np.ndarray, true: np.ndarray,
                       mask: np.ndarray | None = None) -> pd.DataFrame:
    """Mean squared error (vol points²) per date of ``pred`` and ``bench`` on the same rows (``mask``), by date."""
    keep = np.isfinite(pred) & np.isfinite(bench) & np.isfinite(true)
    if mask is not None:
        keep &= mask
    e = pd.DataFrame({"date": np.asarray(dates)[keep], "model": ((pred - true)[keep] * VOL_POINTS) ** 2,
                      "bench": ((bench - true)[keep] * VOL_POINTS) ** 2})
    return e.groupby("date", sort=True).mean()


def compare(dates: np.ndarray, pred: np.ndarray, bench: np.ndarray, true: np.ndarray,
            mask: np.ndarray | None = None, horizon: int = 1) -> tuple[DMResult, float]:
    """(DM test of ``pred`` against ``bench``, share of dates on which ``pred``'s RMSE is below ``bench``'s)."""
    per_date = per_date_sq_errors(dates, pred, bench, true, mask)
    if per_date.empty:
        return NAN_DM, math.nan
    same = bool((per_date["model"] == per_date["bench"]).all())  # e.g. the baseline against persistence
    beaten = math.nan if same else float((per_date["model"] < per_date["bench"]).mean())
    return diebold_mariano(per_date["model"].to_numpy(), per_date["bench"].to_numpy(), horizon=horizon), beaten
