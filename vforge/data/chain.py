"""Your own option chains (CSV or Parquet) through the canonical contract of DESIGN.md.

``load`` reads one file (or a glob of files), renames columns through ``data.columns``, checks
every rule of the contract and stops with an error that names the rule, the column and up to five
offending rows; rows that are merely unusable (zero bid, price outside the no-arbitrage bounds,
IV not invertible, too wide a spread) are dropped and counted by reason in the data report.
"""

from __future__ import annotations

import glob as globlib
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vforge.data import dataset as D
from vforge.data.iv import REASONS, bs_vega, implied_vol

# Drops made by the pipeline after loading (dataset.build_rows / prepare): not quotes lost at load.
PIPELINE_DROPS = ("drop_first_date", "drop_no_target", "drop_no_previous_surface", "drop_missing_feature")
REQUIRED = ["quote_date", "expiry", "strike", "option_type"]
OPTION_TYPES = {"c": "C", "call": "C", "calls": "C", "p": "P", "put": "P", "puts": "P"}
FORWARDS = ("spot", "column", "parity")
IV_RANGE = {"decimal": (0.0, 5.0), "percent": (0.5, 500.0)}  # plausible medians

# Quotes dropped at load time (the pipeline's own reasons are in dataset.DROP_REASONS).
D.DROP_REASONS.update({
    "drop_outside_dates": "quote date outside data.start_date..data.end_date (selected out, not bad)",
    "drop_duplicate": "duplicate contract on a quote date (data.duplicates: drop = every copy, first = the others)",
    "drop_expired": "expiry on the quote date (zero time to expiry)",
    "drop_zero_bid": "zero (or missing) bid",
    "drop_missing_price": "no price: IV, bid/ask and price all missing",
    "drop_missing_iv": "implied_volatility missing or not positive",
    "drop_no_parity_forward": "no call/put pair on the same expiry to take a parity forward from",
    "drop_min_price": "price below data.min_price (a minimum-tick price does not identify IV)",
    "drop_short_expiry": "fewer than data.min_days calendar days to expiry",
    "drop_iv_range": "IV outside the plausible range data.iv_range",
    "drop_wide_spread": "bid/ask spread wider than data.max_spread_vol in volatility",
    "drop_iv_outside_quote": "given IV outside its own bid/ask IV band by more than data.max_iv_outside_quote",
    "drop_in_the_money": "in the money (data.otm_only=true keeps puts below the forward, calls above)",
})
for _code, _text in REASONS.items():
    if _code:
        D.DROP_REASONS[f"drop_iv_{_text.split(' (')[0].replace(' ', '_').replace('-', '_')}"] = f"IV inversion: {_text}"


def _reason_key(code: int) -> str:
    return f"drop_iv_{REASONS[code].split(' (')[0].replace(' ', '_').replace('-', '_')}"


def read_table(path: str | Path, *, read_options: dict | None = None,
               quote_date_from_path: str | None = None) -> pd.DataFrame:
    """One CSV/Parquet file, or every file matching a glob pattern (concatenated, a ``_file`` column added).

    ``quote_date_from_path``: a regex whose first group is the file's quote date (one date a file).
    """
    path = str(path)
    files = sorted(globlib.glob(path)) if any(ch in path for ch in "*?[") else [path]
    if not files or not Path(files[0]).exists():
        raise FileNotFoundError(
            f"data.path={path!r} matches no file (relative paths start at {Path.cwd()}); "
            "set data.path=<file.csv|file.parquet|glob>"
        )
    frames = []
    for f in files:
        df = pd.read_parquet(f) if Path(f).suffix in (".parquet", ".pq") else pd.read_csv(f, **(read_options or {}))
        df = df.loc[:, [c for c in df.columns if not str(c).startswith("Unnamed")]]
        df["_file"] = Path(f).name
        if quote_date_from_path:
            m = re.search(quote_date_from_path, Path(f).name)
            if not m:
                raise ValueError(f"data.quote_date_from_path={quote_date_from_path!r} does not match file name "
                                 f"{Path(f).name!r}; give a regex whose first group is the date")
            df["quote_date"] = m.group(1)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _rows(mask: Any, df: pd.DataFrame | None = None) -> str:
    idx = np.flatnonzero(np.asarray(mask))
    where = ""
    if df is not None and "_file" in df.columns and df["_file"].nunique() > 1:
        where = " in " + ", ".join(sorted(set(df["_file"].iloc[idx[:5]])))
    return f"{len(idx)} row(s), e.g. rows {idx[:5].tolist()}{where} (0-based, header excluded)"


def _show(value: Any) -> str:
    return str(value.date()) if isinstance(value, pd.Timestamp) else f"{value:g}" if isinstance(value, float) else str(value)


def _parse_dates(df: pd.DataFrame, col: str) -> pd.Series:
    """Dates per source file (files may use different formats); unparseable ones are an error."""
    raw = df[col]
    out = pd.Series(pd.NaT, index=df.index, dtype="datetime64[ns]")
    for _, idx in df.groupby("_file", sort=False).groups.items():
        values = raw.loc[idx]
        if not pd.api.types.is_datetime64_any_dtype(values):
            values = values.astype(str).str.strip().str.replace(r"\.0$", "", regex=True).where(values.notna())
        try:
            with warnings.catch_warnings():  # "could not infer format": the mixed-format fallback below handles it
                warnings.simplefilter("ignore", UserWarning)
                parsed = pd.to_datetime(values, errors="coerce")
        except (ValueError, TypeError):
            parsed = pd.Series(pd.NaT, index=values.index)
        if parsed.isna().any():
            parsed = parsed.fillna(pd.to_datetime(values, errors="coerce", format="mixed"))
        if getattr(parsed.dt, "tz", None) is not None:
            parsed = parsed.dt.tz_localize(None)
        out.loc[idx] = parsed.astype("datetime64[ns]")
    bad = out.isna() & raw.notna() | raw.isna()
    if bad.any():
        example = raw[bad].head(3).tolist()
        raise ValueError(f"{col}: unparseable or missing dates in {_rows(bad, df)}, values {example}. "
                         f"Fix the column, or map another one with data.columns.{col}=<your column>")
    return out.dt.normalize()


def normalize(raw: pd.DataFrame, *, columns: dict[str, str], iv_unit: str, rate: float, dividend_yield: float,
              report: dict, forward: str = "spot", option_type: str | None = None, duplicates: str = "error",
              max_spread_vol: float | None = None, otm_only: bool = False, start_date: str | None = None,
              end_date: str | None = None, min_price: float | None = None, itm_from_otm: bool = False,
              min_days: int | None = None, iv_range: tuple[float, float] | None = None,
              max_iv_outside_quote: float | None = None) -> pd.DataFrame:
    """Rename, type and check a raw table; fill IV by inversion where it is missing; apply the quote filters.

    Unusable rows are dropped and counted in ``report['dropped']`` by reason; impossible values
    raise ``ValueError`` naming the rule and the rows. Quote filters (None turns one off): ``min_days`` calendar
    days to expiry, ``iv_range`` (lo, hi) plausible IVs, ``max_spread_vol`` the bid/ask spread in vol,
    ``max_iv_outside_quote`` how far (vol) a given IV may lie outside its own bid/ask band (``iv_outside_quote``).
    """
    if iv_unit not in IV_RANGE:
        raise ValueError(f"data.iv_unit must be 'decimal' or 'percent', got {iv_unit!r}")
    if forward not in FORWARDS:
        raise ValueError(f"data.forward must be one of {', '.join(FORWARDS)}, got {forward!r}")
    df = raw.rename(columns={v: k for k, v in columns.items() if v is not None and v != k})
    if "_file" not in df.columns:
        df["_file"] = "table"
    dropped = report.setdefault("dropped", {})
    report["loaded"] = report.get("loaded", 0) + len(df)

    need = [c for c in REQUIRED if not (c == "option_type" and option_type)]
    need += {"spot": ["underlying_price"], "column": ["forward"], "parity": []}[forward]
    missing = [c for c in need if c not in df.columns]
    if missing:
        hints = {"underlying_price": " (or data.forward=parity to take forwards from call/put pairs)",
                 "option_type": " (or data.option_type=otm when each row is the out-of-the-money side)"}
        raise ValueError(
            f"required column(s) {missing} not found; the table has {[c for c in raw.columns if c != '_file']}. "
            f"Map yours with data.columns, e.g. data.columns.{missing[0]}=<your column name>"
            f"{hints.get(missing[0], '')}"
        )
    has_iv = "implied_volatility" in df.columns or {"iv_bid", "iv_ask"} <= set(df.columns)
    has_price = {"bid", "ask"} <= set(df.columns) or "price" in df.columns
    if not has_iv and not has_price:
        raise ValueError(
            f"no implied_volatility and no prices to invert it from; the table has "
            f"{[c for c in raw.columns if c != '_file']}. Map one with data.columns.implied_volatility=<column>, "
            "data.columns.bid=... and data.columns.ask=..., or data.columns.price=<column>"
        )

    df["quote_date"] = _parse_dates(df, "quote_date")
    df["expiry"] = _parse_dates(df, "expiry")
    if start_date or end_date:
        keep = df["quote_date"].between(pd.Timestamp(start_date or "1900-01-01"), pd.Timestamp(end_date or "2200-01-01"))
        dropped["drop_outside_dates"] = int((~keep).sum())
        df = df[keep].reset_index(drop=True)
        if df.empty:
            raise ValueError(f"no quote dates between data.start_date={start_date} and data.end_date={end_date}")
    numeric = [c for c in ("strike", "underlying_price", "forward", "implied_volatility", "iv_bid", "iv_ask", "bid",
                           "ask", "price", "rate", "dividend_yield", "time_to_expiry") if c in df.columns]
    for col in numeric:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() & df[col].notna() & (df[col].astype(str).str.strip() != "")
        if bad.any():
            raise ValueError(f"{col}: non-numeric values in {_rows(bad, df)}, values {df.loc[bad, col].head(3).tolist()}")
        df[col] = values.astype(np.float64)

    if option_type:
        if "option_type" in df.columns:
            raise ValueError(f"data.option_type={option_type!r} but the table has an option_type column; "
                             "set data.option_type=null")
        if option_type not in ("otm", "C", "P"):
            raise ValueError(f"data.option_type must be null, 'otm', 'C' or 'P', got {option_type!r}")
    else:
        spelled = df["option_type"].astype(str).str.strip().str.lower()
        df["option_type"] = spelled.map(OPTION_TYPES)
        bad = df["option_type"].isna()
        if bad.any():
            raise ValueError(f"option_type: unknown spellings {sorted(set(spelled[bad]))[:5]} in {_rows(bad, df)}; "
                             f"accepted: {', '.join(OPTION_TYPES)} (any case)")

    # Impossible values: errors, never silent drops. (rule, offending rows, columns to show, how to fix)
    mapping = "check data.columns.{} points at the right column"
    rules = [
        ("strike must be > 0", df["strike"] <= 0, ["strike"], mapping.format("strike")),
        ("expiry must not be before quote_date", df["expiry"] < df["quote_date"], ["quote_date", "expiry"],
         "check data.columns.expiry and data.columns.quote_date, and that the dates parse as intended "
         "(e.g. day-first vs month-first); remove rows of expired contracts"),
    ]
    for col in ("bid", "ask", "price"):
        if col in df.columns:
            rules.append((f"{col} must be >= 0", df[col] < 0, [col], mapping.format(col)))
    for col in ("underlying_price", "forward"):
        if col in df.columns:
            rules.append((f"{col} must be > 0", df[col] <= 0, [col], mapping.format(col)))
    if {"bid", "ask"} <= set(df.columns):
        rules.append(("bid must not exceed ask (crossed quote)", df["bid"] > df["ask"], ["bid", "ask"],
                      "check that data.columns.bid and data.columns.ask are not swapped; remove crossed quotes"))
    if {"iv_bid", "iv_ask"} <= set(df.columns):
        rules.append(("iv_bid must not exceed iv_ask (crossed quote)", df["iv_bid"] > df["iv_ask"], ["iv_bid", "iv_ask"],
                      "check that data.columns.iv_bid and data.columns.iv_ask are not swapped"))
    for rule, bad, cols, fix in rules:
        if bad.any():
            shown = "; ".join(", ".join(f"{c}={_show(df.at[i, c])}" for c in cols) for i in df.index[bad][:3])
            raise ValueError(f"{rule}: violated by {_rows(bad, df)}: {shown}. To fix: {fix}")

    for col, default in (("rate", rate), ("dividend_yield", dividend_yield)):
        if col not in df.columns:
            df[col] = float(default)
            report.setdefault("assumed", {})[col] = f"{float(default):g} used (data.{col}): the table has no {col} column"
        elif df[col].isna().any():
            report.setdefault("assumed", {})[col] = (f"{float(default):g} used (data.{col}) on "
                                                     f"{int(df[col].isna().sum()):,} rows where {col} is missing")
        df[col] = df[col].fillna(float(default))

    key = ["quote_date", "expiry", "strike"] + ([] if option_type else ["option_type"])
    dup = df.duplicated(key, keep=False)
    if dup.any():
        if duplicates == "error":
            raise ValueError(f"duplicate contracts (same {', '.join(key)}) in {_rows(dup, df)}. "
                             "Set data.duplicates=drop to drop every copy, or first to keep the first")
        drop = dup if duplicates == "drop" else df.duplicated(key, keep="first")
        dropped["drop_duplicate"] = int(drop.sum())
        df = df[~drop].reset_index(drop=True)

    expired = df["expiry"] == df["quote_date"]
    dropped["drop_expired"] = int(expired.sum())
    df = df[~expired].reset_index(drop=True)
    if "time_to_expiry" in df.columns:
        tau = df["time_to_expiry"].to_numpy()
    else:
        tau = (df["expiry"] - df["quote_date"]).dt.days.to_numpy() / 365.0

    # Implied volatility given: check its unit against what the values say.
    iv = pd.Series(np.nan, index=df.index)
    if "implied_volatility" in df.columns:
        iv = df["implied_volatility"]
    elif {"iv_bid", "iv_ask"} <= set(df.columns):
        iv = 0.5 * (df["iv_bid"] + df["iv_ask"])
        zero_bid = df["iv_bid"].isna() | (df["iv_bid"] <= 0)
        dropped["drop_zero_bid"] = dropped.get("drop_zero_bid", 0) + int(zero_bid.sum())
        iv = iv.where(~zero_bid)
        df = df[~zero_bid].reset_index(drop=True)
        iv, tau = iv[~zero_bid].reset_index(drop=True), tau[~zero_bid.to_numpy()]
    given = iv.dropna()
    given = given[given > 0]
    if len(given):
        med = float(given.median())
        lo, hi = IV_RANGE[iv_unit]
        if not lo <= med <= hi:
            other = "percent" if iv_unit == "decimal" else "decimal"
            raise ValueError(
                f"data.iv_unit={iv_unit} but the implied volatilities look like {other}: median {med:.4g} "
                f"(expected {lo:g}..{hi:g} for {iv_unit}). Set data.iv_unit={other}"
            )
    scale = 0.01 if iv_unit == "percent" else 1.0
    df["implied_volatility"] = iv * scale
    for col in ("iv_bid", "iv_ask"):
        if col in df.columns:
            df[col] = df[col] * scale

    # Price to invert from where IV is absent: the bid/ask mid, else a price (e.g. a close).
    price = None
    if {"bid", "ask"} <= set(df.columns):
        price = 0.5 * (df["bid"] + df["ask"])
    elif "price" in df.columns:
        price = df["price"]
    need_iv = df["implied_volatility"].isna() | (df["implied_volatility"] <= 0)
    df["_iv_given"] = ~need_iv
    if price is not None:
        for reason in ("drop_zero_bid", "drop_missing_price"):
            if reason == "drop_zero_bid":
                if "bid" not in df.columns:
                    continue
                bad = need_iv & ((df["bid"] <= 0) | df["bid"].isna())
            else:
                bad = need_iv & price.isna()
            dropped[reason] = dropped.get(reason, 0) + int(bad.sum())
            keep = ~bad.to_numpy()
            df, price, need_iv, tau = (df[keep].reset_index(drop=True), price[keep].reset_index(drop=True),
                                       need_iv[keep].reset_index(drop=True), tau[keep])

    if price is not None and min_price:
        cheap = need_iv & (price < min_price)
        dropped["drop_min_price"] = int(cheap.sum())
        keep = ~cheap.to_numpy()
        df, price, need_iv, tau = (df[keep].reset_index(drop=True), price[keep].reset_index(drop=True),
                                   need_iv[keep].reset_index(drop=True), tau[keep])

    # Forward: the spot carried at r - q, a given column, or put-call parity per (date, expiry).
    carry = np.exp((df["rate"] - df["dividend_yield"]).to_numpy() * tau)
    if forward == "spot":
        df["forward"] = df["underlying_price"].to_numpy() * carry
    elif forward == "parity":
        if price is None:
            raise ValueError("data.forward=parity needs prices (bid/ask or price) of calls and puts")
        df["forward"] = parity_forward(df, price, tau)
        nofwd = df["forward"].isna()
        dropped["drop_no_parity_forward"] = int(nofwd.sum())
        keep = ~nofwd.to_numpy()
        df, price, need_iv, tau = df[keep].reset_index(drop=True), price[keep].reset_index(drop=True), \
            need_iv[keep].reset_index(drop=True), tau[keep]
    if "underlying_price" not in df.columns:
        df["underlying_price"] = df["forward"] / np.exp((df["rate"] - df["dividend_yield"]).to_numpy() * tau)
    if option_type:
        df["option_type"] = (np.where(df["strike"] >= df["forward"], "C", "P") if option_type == "otm"
                             else option_type)

    if need_iv.any():
        if price is None:
            dropped["drop_missing_iv"] = int(need_iv.sum())
        else:
            m = need_iv.to_numpy()
            sigma, reason = implied_vol(price[m].to_numpy(), df["forward"][m].to_numpy(), df["strike"][m].to_numpy(),
                                        tau[m], df["rate"][m].to_numpy(), (df["option_type"][m] == "C").to_numpy())
            df.loc[m, "implied_volatility"] = sigma
            inv_reason = np.zeros(len(df), dtype=np.int8)
            inv_reason[m] = reason
    width = spread_vol(df, tau)
    if itm_from_otm:
        # The IV of a strike is its out-of-the-money quote's: an ITM row takes it (and its spread)
        # where the OTM counterpart exists; deep ITM quotes carry little information about volatility.
        key = ["quote_date", "expiry", "strike"]
        itm = np.where(df["option_type"] == "C", df["strike"] < df["forward"], df["strike"] > df["forward"])
        otm = df.loc[~itm, key].assign(_iv=df.loc[~itm, "implied_volatility"], _w=width[~itm])
        otm = otm[np.isfinite(otm["_iv"]) & (otm["_iv"] > 0)].drop_duplicates(key)
        counterpart = df[key].merge(otm, on=key, how="left")
        take = itm & counterpart["_iv"].notna().to_numpy()
        df.loc[take, "implied_volatility"] = counterpart.loc[take, "_iv"].to_numpy()
        df.loc[take, "_iv_given"] = False
        width = width.where(~take, counterpart["_w"])
        report["itm_iv_from_otm"] = report.get("itm_iv_from_otm", 0) + int(take.sum())
    bad_iv = ~(np.isfinite(df["implied_volatility"]) & (df["implied_volatility"] > 0))
    if need_iv.any() and price is not None:
        failed = inv_reason[bad_iv.to_numpy()]
        for code, count in zip(*np.unique(failed[failed != 0], return_counts=True)):
            dropped[_reason_key(int(code))] = dropped.get(_reason_key(int(code)), 0) + int(count)
    if bad_iv.any():
        dropped["drop_missing_iv"] = dropped.get("drop_missing_iv", 0) + int(bad_iv[~need_iv].sum())
    keep = ~bad_iv.to_numpy()
    df, tau, width = df[keep].reset_index(drop=True), tau[keep], width[keep].reset_index(drop=True)
    if price is not None:
        price = price[keep].reset_index(drop=True)

    # Quote filters a quant applies before fitting anything, each counted under its own reason, in this order.
    filters: dict[str, Callable[[], Any] | None] = {
        "drop_short_expiry": None if not min_days else
        lambda: ((df["expiry"] - df["quote_date"]).dt.days < min_days).to_numpy(),
        "drop_iv_range": None if not iv_range else lambda: ~df["implied_volatility"].between(*iv_range).to_numpy(),
        "drop_wide_spread": None if max_spread_vol is None else lambda: (width > max_spread_vol).to_numpy(),
        "drop_iv_outside_quote": None if max_iv_outside_quote is None else
        lambda: iv_outside_quote(df, tau) > max_iv_outside_quote,
    }
    for reason, check in filters.items():
        if check is not None:
            bad = check()
            dropped[reason] = int(bad.sum())
            df, tau, width = df[~bad].reset_index(drop=True), tau[~bad], width[~bad].reset_index(drop=True)
    if otm_only:
        itm = np.where(df["option_type"] == "C", df["strike"] < df["forward"], df["strike"] > df["forward"])
        dropped["drop_in_the_money"] = int(itm.sum())
        df, tau = df[~itm].reset_index(drop=True), tau[~itm]
    if "time_to_expiry" in df.columns:
        df["time_to_expiry"] = tau
    return df.drop(columns=["_file", "_iv_given"])


def iv_outside_quote(df: pd.DataFrame, tau: np.ndarray) -> np.ndarray:
    """For rows whose IV was given (not inverted here) and that carry a bid and an ask: how far (in vol) the given
    IV lies outside the band of IVs of its own bid and ask, after removing each (quote date, expiry, type)'s median
    offset between given and mid IVs (a dividend or rate the table does not carry moves the whole expiry, not one
    quote). 0 inside the band and where the check does not apply."""
    out = np.zeros(len(df))
    if not {"bid", "ask"} <= set(df.columns):
        return out
    m = (df["_iv_given"] & (df["ask"] > 0)).to_numpy()
    if not m.any():
        return out
    g = df[m]
    args = (g["forward"].to_numpy(), g["strike"].to_numpy(), tau[m], g["rate"].to_numpy(),
            (g["option_type"] == "C").to_numpy())
    lo = np.where(g["bid"] > 0, implied_vol(g["bid"].to_numpy(), *args)[0], 0.0)
    hi = implied_vol(g["ask"].to_numpy(), *args)[0]
    lo, hi = np.nan_to_num(lo, nan=0.0), np.nan_to_num(hi, nan=np.inf)
    given = g["implied_volatility"].to_numpy()
    mid = np.where(np.isfinite(hi), 0.5 * (lo + hi), given)
    offset = pd.Series(given - mid).groupby([g["quote_date"].to_numpy(), g["expiry"].to_numpy(),
                                             g["option_type"].to_numpy()]).transform("median").to_numpy()
    shifted = given - offset
    out[m] = np.maximum(lo - shifted, 0.0) + np.maximum(shifted - hi, 0.0)
    return out


def spread_vol(df: pd.DataFrame, tau: np.ndarray) -> pd.Series:
    """Bid/ask spread in volatility: ``iv_ask - iv_bid``, or ``(ask - bid) / vega``; 0 where unknown."""
    if {"iv_bid", "iv_ask"} <= set(df.columns):
        return (df["iv_ask"] - df["iv_bid"]).fillna(0.0)
    if {"bid", "ask"} <= set(df.columns):
        vega = bs_vega(df["forward"], df["strike"], tau, df["implied_volatility"], df["rate"])
        with np.errstate(divide="ignore", invalid="ignore"):
            return pd.Series((df["ask"] - df["bid"]).to_numpy() / vega, index=df.index).fillna(np.inf)
    return pd.Series(0.0, index=df.index)


def parity_forward(df: pd.DataFrame, price: pd.Series, tau: np.ndarray, n_pairs: int = 5) -> np.ndarray:
    """Per (quote date, expiry): the median over the ``n_pairs`` strikes nearest the money (smallest
    |C - P|) of ``K + (C - P) / D``, ``D = exp(-r T)``. NaN where the expiry has no call/put pair."""
    d = pd.DataFrame({"quote_date": df["quote_date"], "expiry": df["expiry"], "strike": df["strike"],
                      "type": df["option_type"], "price": price.to_numpy(), "disc": np.exp(-df["rate"].to_numpy() * tau)})
    d = d[np.isfinite(d["price"]) & (d["price"] > 0)]
    calls = d[d["type"] == "C"].drop(columns="type").rename(columns={"price": "c"})
    puts = d[d["type"] == "P"][["quote_date", "expiry", "strike", "price"]].rename(columns={"price": "p"})
    pairs = calls.merge(puts, on=["quote_date", "expiry", "strike"])
    pairs["gap"] = (pairs["c"] - pairs["p"]).abs()
    pairs["fwd"] = pairs["strike"] + (pairs["c"] - pairs["p"]) / pairs["disc"]
    pairs = pairs.sort_values("gap").groupby(["quote_date", "expiry"]).head(n_pairs)
    fwd = pairs.groupby(["quote_date", "expiry"])["fwd"].median().rename("_fwd")
    return df[["quote_date", "expiry"]].join(fwd, on=["quote_date", "expiry"])["_fwd"].to_numpy()


def load(*, path: str, columns: dict[str, str], iv_unit: str, rate: float, dividend_yield: float,
         features: list[str], target: str, horizon: int, val_fraction: float, test_fraction: float,
         forward: str = "spot", option_type: str | None = None, duplicates: str = "error",
         max_spread_vol: float | None = None, otm_only: bool = False, start_date: str | None = None,
         end_date: str | None = None, quote_date_from_path: str | None = None, read_options: dict | None = None,
         min_price: float | None = None, itm_from_otm: bool = False, min_days: int | None = None,
         iv_range: tuple[float, float] | None = None, max_iv_outside_quote: float | None = None,
         winsorize: float | None = None,
         cat_features: list[str] | None = None, n_folds: int = 1, fold: int = 0, fallback: str = "moneyness",
         train_dates: int | None = None) -> D.Dataset:
    """A chain file as a ready-to-train ``Dataset``; the data report says what was dropped and why."""
    report: dict = {}
    raw = read_table(path, read_options=dict(read_options or {}), quote_date_from_path=quote_date_from_path)
    chain = normalize(raw, columns=dict(columns), iv_unit=iv_unit, rate=rate, dividend_yield=dividend_yield,
                      report=report, forward=forward, option_type=option_type, duplicates=duplicates,
                      max_spread_vol=max_spread_vol, otm_only=otm_only, start_date=start_date, end_date=end_date,
                      min_price=min_price, itm_from_otm=itm_from_otm, min_days=min_days, iv_range=iv_range,
                      max_iv_outside_quote=max_iv_outside_quote)
    ds = D.prepare(chain, features=list(features), target=target, horizon=horizon, val_fraction=val_fraction,
                   test_fraction=test_fraction, source=str(path), cat_features=cat_features, n_folds=n_folds,
                   fold=fold, fallback=fallback, train_dates=train_dates, winsorize=winsorize)
    ds.report["dropped"] = {**report.pop("dropped"), **ds.report["dropped"]}
    ds.report = {"source": ds.report.pop("source"), **report, **ds.report}
    return ds
