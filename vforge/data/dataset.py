"""From a canonical chain table to train/val/test tensors: features, targets, split, scaling.

The one pipeline every data option goes through (see DESIGN.md, "The data contract").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy.spatial import cKDTree

from vforge.data import features as F

CONTRACT = ["expiry", "strike", "option_type"]


@dataclass
class Split:
    """One chronological part of the data.

    ``x_num`` (n, n_num) float32 scaled features; ``x_cat`` (n, n_cat) int64 or None;
    ``y`` (n,) float32 the model's target (scaled); ``iv`` (n,) the target IV level (decimal);
    ``base`` (n,) what a predicted change is added to; ``persistence`` (n,) the contract's own
    previous IV (NaN where it was not quoted); ``rows`` the identifying columns.

    ``aux`` holds unscaled per-row values for losses and diagnostics, each a (n,) tensor:
    ``log_moneyness`` (log K/F at the target date), ``tau`` (years), ``base`` (the IV a change is
    added to), ``vega`` (Black-Scholes vega at the base IV per unit of forward, discounted:
    ``exp(-rT) sqrt(T) phi(d1)``), ``is_call`` (1.0/0.0), ``quote_date_idx`` (int64 index of the
    target quote date, to group the rows of one surface).
    """

    x_num: torch.Tensor
    x_cat: torch.Tensor | None
    y: torch.Tensor
    iv: np.ndarray
    base: np.ndarray
    persistence: np.ndarray
    rows: pd.DataFrame
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    train: Split
    val: Split
    test: Split
    feature_names: list[str]
    cat_cardinalities: list[int]
    target: str
    y_center: float
    y_scale: float
    x_mean: np.ndarray
    x_std: np.ndarray
    report: dict = field(default_factory=dict)

    @property
    def n_num(self) -> int:
        return len(self.feature_names)

    def to_level(self, pred: np.ndarray, split: Split) -> np.ndarray:
        """Model outputs (n,) in target units -> IV levels (decimal)."""
        level = np.asarray(pred, dtype=np.float64) * self.y_scale + self.y_center
        return level + split.base if self.target == "change" else level


def add_lagged(chain: pd.DataFrame, horizon: int) -> pd.DataFrame:
    """Rows keyed by terms date with the target IV ``horizon`` quote dates ahead and the info-date IV.

    Expects canonical columns plus ``date_idx`` (position of quote_date among sorted dates).
    """
    lag = 1 if horizon == 0 else 0
    key = [*CONTRACT, "date_idx"]
    iv = chain[key + ["implied_volatility"]]
    rows = chain.copy()
    rows["target_idx"] = rows["date_idx"] + horizon
    rows["info_idx"] = rows["date_idx"] - lag
    target = iv.rename(columns={"date_idx": "target_idx", "implied_volatility": "iv"})
    rows = rows.merge(target, on=[*CONTRACT, "target_idx"], how="inner")
    prev = iv.rename(columns={"date_idx": "info_idx", "implied_volatility": "persistence"})
    return rows.merge(prev, on=[*CONTRACT, "info_idx"], how="left")


def previous_surface(rows: pd.DataFrame, chain: pd.DataFrame) -> np.ndarray:
    """For each row, the info date's IV of the nearest quoted contract of the same type,
    nearest in (log-moneyness, sqrt tau) space; NaN where the info date has no quotes."""
    out = np.full(len(rows), np.nan)
    coords = lambda d: np.column_stack([d["log_moneyness"] / 0.1, np.sqrt(d["tau"]) / 0.1])  # noqa: E731
    by_date = {k: g for k, g in chain.groupby(["date_idx", "option_type"], sort=False)}
    for (info, opt), g in rows.groupby(["info_idx", "option_type"], sort=False):
        src = by_date.get((info, opt))
        if src is None:
            continue
        _, nn = cKDTree(coords(src)).query(coords(g))
        out[rows.index.get_indexer(g.index)] = src["implied_volatility"].to_numpy()[nn]
    return out


def make_aux(df: pd.DataFrame) -> dict[str, torch.Tensor]:
    """Unscaled per-row values for losses (see ``Split.aux``)."""
    lm, tau, base = (df[c].to_numpy(np.float64) for c in ("log_moneyness", "tau", "base"))
    sd = base * np.sqrt(tau)
    with np.errstate(divide="ignore", invalid="ignore"):
        d1 = -lm / sd + 0.5 * sd
    vega = np.exp(-df["rate"].to_numpy(np.float64) * tau) * np.sqrt(tau) * np.exp(-0.5 * d1 * d1) / np.sqrt(2 * np.pi)
    f32 = lambda a: torch.tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
    return {
        "log_moneyness": f32(lm), "tau": f32(tau), "base": f32(base), "vega": f32(np.nan_to_num(vega)),
        "is_call": f32((df["option_type"] == "C").to_numpy()),
        "quote_date_idx": torch.tensor(df["target_idx"].to_numpy(np.int64)),
    }


def prepare(chain: pd.DataFrame, *, features: list[str], target: str, horizon: int, val_fraction: float,
            test_fraction: float, source: str = "chain") -> Dataset:
    """Canonical chain (IV filled) -> ``Dataset``. No feature of a row uses data after its info date."""
    F.validate_names(features)
    if target not in ("level", "change"):
        raise ValueError(f"data.target must be 'level' or 'change', got {target!r}")
    if horizon < 0:
        raise ValueError(f"data.horizon must be >= 0, got {horizon}")
    chain = chain.sort_values(["quote_date", *CONTRACT]).reset_index(drop=True)
    dates = pd.DatetimeIndex(np.sort(chain["quote_date"].unique()))
    chain["date_idx"] = dates.get_indexer(chain["quote_date"])
    tau = (chain["expiry"] - chain["quote_date"]).dt.days.to_numpy() / 365.0
    fwd = chain["underlying_price"] * np.exp((chain["rate"] - chain["dividend_yield"]) * tau)
    chain["tau"] = tau
    chain["log_moneyness"] = np.log(chain["strike"] / fwd)

    # Market state per quote date from the spot up to that date.
    spot = chain.groupby("date_idx")["underlying_price"].median()
    state = F.market_state(spot)
    chain = chain.join(state, on="date_idx")
    surf = chain.rename(columns={"implied_volatility": "iv"})
    atm = pd.Series({d: F.atm_iv_30d(g) for d, g in surf.groupby("date_idx")}, name="prev_atm_iv")

    rows = add_lagged(chain, horizon)
    rows = rows[rows["info_idx"] >= 0].reset_index(drop=True)
    n_target_dates = rows["target_idx"].nunique()
    # Terms at the target date: tau runs to expiry from the date being predicted.
    target_dates = dates[rows["target_idx"].to_numpy()]
    rows["tau"] = (pd.DatetimeIndex(rows["expiry"]) - target_dates).days.to_numpy() / 365.0
    rows["sqrt_tau"] = np.sqrt(rows["tau"])
    rows["is_call"] = (rows["option_type"] == "C").astype(float)
    rows["gap_days"] = (target_dates - dates[rows["info_idx"].to_numpy()]).days.to_numpy().astype(float)
    rows["prev_atm_iv"] = atm.reindex(rows["info_idx"]).to_numpy()
    fallback = previous_surface(rows, chain)
    rows["prev_iv_missing"] = rows["persistence"].isna().astype(float)
    rows["prev_iv"] = rows["persistence"].fillna(pd.Series(fallback, index=rows.index))
    rows["base"] = rows["prev_iv"]
    n_before = len(rows)
    rows = rows[np.isfinite(rows["base"])].reset_index(drop=True)
    report = {"source": source, "quotes": len(chain), "quote_dates": len(dates), "rows": len(rows),
              "target_dates": n_target_dates, "dropped_no_previous_surface": n_before - len(rows)}

    # Chronological split on the target date, with an embargo of `horizon` dates before val and test.
    udates = np.sort(rows["target_idx"].unique())
    n = len(udates)
    n_test = max(1, int(round(n * test_fraction)))
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_test - n_val < 1:
        raise ValueError(f"too few quote dates ({n}) for val_fraction={val_fraction}, test_fraction={test_fraction}")
    train_end, val_end = udates[n - n_test - n_val - 1], udates[n - n_test - 1]
    t = rows["target_idx"]
    # Info for val/test rows must come after the last train target: drop `horizon` dates.
    parts = {
        "train": rows[t <= train_end],
        "val": rows[(t > train_end + horizon) & (t <= val_end)],
        "test": rows[t > val_end + horizon],
    }
    train = parts["train"]
    x_mean = train[features].mean().to_numpy()
    x_std = train[features].std().replace(0, 1).fillna(1).to_numpy()
    if target == "change":
        center, scale = 0.0, float((train["iv"] - train["base"]).std() or 1.0)
    else:
        center, scale = float(train["iv"].mean()), float(train["iv"].std() or 1.0)

    def make(df: pd.DataFrame) -> Split:
        x = (df[features].to_numpy() - x_mean) / x_std
        y = (df["iv"] - (df["base"] if target == "change" else 0.0) - center) / scale
        return Split(
            x_num=torch.as_tensor(x, dtype=torch.float32), x_cat=None,
            y=torch.tensor(y.to_numpy(), dtype=torch.float32),
            iv=df["iv"].to_numpy(), base=df["base"].to_numpy(), persistence=df["persistence"].to_numpy(),
            rows=df[["quote_date", *CONTRACT]].reset_index(drop=True),
            aux=make_aux(df),
        )

    splits = {k: make(v) for k, v in parts.items()}
    for k, v in parts.items():
        report[f"{k}_rows"] = len(v)
        report[f"{k}_dates"] = f"{dates[v['target_idx'].min()].date()}..{dates[v['target_idx'].max()].date()}" if len(v) else "-"
    return Dataset(**splits, feature_names=list(features), cat_cardinalities=[], target=target,
                   y_center=center, y_scale=scale, x_mean=x_mean, x_std=x_std, report=report)
