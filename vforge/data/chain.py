"""Your own option chains (CSV or Parquet) through the canonical contract of DESIGN.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from vforge.data.dataset import Dataset, prepare
from vforge.data.iv import REASONS, implied_vol

REQUIRED = ["quote_date", "expiry", "strike", "option_type", "underlying_price"]
OPTION_TYPES = {"c": "C", "call": "C", "p": "P", "put": "P"}


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data.path={str(path)!r} does not exist (relative paths start at {Path.cwd()})")
    if path.suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    return pd.read_csv(path)


def normalize(raw: pd.DataFrame, *, columns: dict[str, str], iv_unit: str, rate: float, dividend_yield: float,
              report: dict) -> pd.DataFrame:
    """Rename, type and check a raw table; fill IV by inversion where it is missing.

    Unusable rows are dropped and counted in ``report['dropped']`` by reason.
    """
    df = raw.rename(columns={v: k for k, v in columns.items()})
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(
            f"required column(s) {missing} not found; the table has {list(raw.columns)}. "
            f"Map yours with data.columns, e.g. data.columns.{missing[0]}=<your column name>"
        )
    df["quote_date"] = pd.to_datetime(df["quote_date"])
    df["expiry"] = pd.to_datetime(df["expiry"])
    df["option_type"] = df["option_type"].astype(str).str.strip().str.lower().map(OPTION_TYPES)
    for col, default in (("rate", rate), ("dividend_yield", dividend_yield)):
        if col not in df.columns:
            df[col] = default
    dropped = report.setdefault("dropped", {})
    if "implied_volatility" in df.columns:
        iv = df["implied_volatility"].astype(float)
        df["implied_volatility"] = iv / 100.0 if iv_unit == "percent" else iv
    else:
        df["implied_volatility"] = np.nan
    need = df["implied_volatility"].isna()
    if need.any():
        if {"bid", "ask"} <= set(df.columns):
            price = 0.5 * (df["bid"] + df["ask"])
        elif "price" in df.columns:
            price = df["price"]
        else:
            raise ValueError("implied_volatility is missing and there is no bid/ask or price to invert it from")
        tau = (df["expiry"] - df["quote_date"]).dt.days.to_numpy() / 365.0
        fwd = df["underlying_price"] * np.exp((df["rate"] - df["dividend_yield"]) * tau)
        iv, reason = implied_vol(price[need], fwd[need], df["strike"][need], tau[need.to_numpy()],
                                 df["rate"][need], (df["option_type"][need] == "C").to_numpy())
        df.loc[need, "implied_volatility"] = iv
        for code, count in zip(*np.unique(reason[reason != 0], return_counts=True)):
            dropped[REASONS[int(code)]] = dropped.get(REASONS[int(code)], 0) + int(count)
    keep = np.isfinite(df["implied_volatility"]) & (df["implied_volatility"] > 0)
    return df[keep].reset_index(drop=True)


def load(*, path: str, columns: dict[str, str], iv_unit: str, rate: float, dividend_yield: float,
         features: list[str], target: str, horizon: int, val_fraction: float, test_fraction: float) -> Dataset:
    """A chain file as a ready-to-train ``Dataset``."""
    report: dict = {}
    chain = normalize(read_table(path), columns=dict(columns), iv_unit=iv_unit, rate=rate,
                      dividend_yield=dividend_yield, report=report)
    ds = prepare(chain, features=list(features), target=target, horizon=horizon,
                 val_fraction=val_fraction, test_fraction=test_fraction, source=str(path))
    ds.report.update(report)
    return ds
