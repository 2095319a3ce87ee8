"""From a canonical chain table to train/val/test tensors: features, targets, split, scaling.

The one pipeline every data option goes through (see DESIGN.md, "The data contract"):
``build_rows`` turns quotes into rows (features as of the info date, target ``horizon`` quote dates
ahead, the base a change is added to), ``split_rows`` cuts them chronologically with an embargo,
and ``prepare`` scales them on train only and makes tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from vforge.data import features as feats
from vforge.data.iv import REASONS, bs_vega
from vforge.data.target import VOL_POINTS, to_level

CONTRACT = ["expiry", "strike", "option_type"]

# Every drop reason of the data report and what it means (printed by ``format_report``): the one place they are
# declared. The pipeline's own (``build_rows`` / ``prepare``), not quotes lost at load:
PIPELINE_DROPS = {
    "drop_first_date": "first quote date: no previous date to take features from",
    "drop_no_target": "no quote of the contract `horizon` quote dates later",
    "drop_no_previous_surface": "no quote of the same option type on the previous date (no base)",
    "drop_missing_feature": "a selected feature is missing",
}
# Quotes dropped at load time (``chain.normalize``), in the order the loader checks them.
LOAD_DROPS = {
    "drop_outside_dates": "quote date outside data.start_date..data.end_date (selected out, not bad)",
    "drop_missing_terms": "strike, underlying_price or forward missing",
    "drop_implausible": "outside data.plausible ranges (data.implausible=drop)",
    "drop_duplicate": "duplicate contract on a quote date (data.duplicates: drop = every copy, first = the others)",
    "drop_expired": "expiry on the quote date (zero time to expiry)",
    "drop_zero_bid": "zero (or missing) bid",
    "drop_missing_price": "no price: IV, bid/ask and price all missing",
    "drop_min_price": "price below data.min_price (a minimum-tick price does not identify IV)",
    "drop_no_parity_forward": "no call/put pair on the same expiry to take a parity forward from",
    "drop_missing_iv": "implied_volatility missing or not positive",
    "drop_iv_implausible": "IV inversion: outside data.plausible.iv (a stale or torn price)",
    "drop_short_expiry": "fewer than data.min_days calendar days to expiry",
    "drop_iv_range": "IV outside the plausible range data.iv_range",
    "drop_wide_spread": "bid/ask spread wider than data.max_spread_vol in volatility",
    "drop_iv_outside_quote": "given IV outside its own bid/ask IV band by more than data.max_iv_outside_quote",
    "drop_in_the_money": "in the money (data.otm_only=true keeps puts below the forward, calls above)",
}


def iv_drop_key(code: int) -> str:
    """The report key of an IV the inverter could not find, by its reason code (``iv.REASONS``)."""
    return f"drop_iv_{REASONS[code].split(' (')[0].replace(' ', '_').replace('-', '_')}"


DROP_REASONS = {**PIPELINE_DROPS, **LOAD_DROPS,
                **{iv_drop_key(code): f"IV inversion: {text}" for code, text in REASONS.items() if code}}


@dataclass
class Split:
    """One chronological part of the data.

    ``x_num`` (n, n_num) float32 scaled features; ``x_cat`` (n, n_cat) int64 or None;
    ``y`` (n,) float32 the model's target (scaled); ``iv`` (n,) the target IV level (decimal);
    ``base`` (n,) what a predicted change is added to; ``persistence`` (n,) the contract's own
    previous IV (NaN where it was not quoted); ``rows`` the identifying columns (``quote_date``, the terms date, and
    the contract) and the terms evaluation needs: ``target_date``, ``info_date``, ``target_idx``, ``info_idx``,
    ``tau``, ``log_moneyness``, ``forward``, ``delta``, ``rate``, ``dividend_yield`` and, where the chain has them, ``bid``, ``ask``,
    ``iv_bid``, ``iv_ask`` (of the terms date).

    ``aux`` holds unscaled per-row values for losses and diagnostics, each a (n,) tensor:
    ``log_moneyness`` (log K/F on the terms date), ``tau`` (years to expiry from the target date),
    ``base`` (the IV a change is added to), ``vega`` (Black-Scholes vega at the base IV per unit of
    forward, discounted: ``exp(-rT) sqrt(T) phi(d1)``), ``is_call`` (1.0/0.0), ``quote_date_idx``
    (int64 index of the target quote date, to group the rows of one surface).
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
    cat_features: list[str] = field(default_factory=list)
    cat_vocab: dict[str, list[str]] = field(default_factory=dict)
    # Every usable quote (all dates, before any split): date_idx, quote_date, expiry, strike, option_type, tau,
    # log_moneyness, forward, iv. What a surface fit on an information date (SSVI) starts from.
    quotes: pd.DataFrame | None = None
    horizon: int = 0
    # The canonical chain rows of the last quote date: the surface a served model re-marks the next date from.
    last_chain: pd.DataFrame | None = None

    @property
    def n_num(self) -> int:
        return len(self.feature_names)

    def to_level(self, pred: np.ndarray, split: Split) -> np.ndarray:
        """Model outputs (n,) in target units -> IV levels (decimal)."""
        return to_level(np.asarray(pred, dtype=np.float64), y_center=self.y_center, y_scale=self.y_scale,
                        base=split.base if self.target == "change" else None)


def add_lagged(chain: pd.DataFrame, horizon: int) -> pd.DataFrame:
    """Rows keyed by terms date with the target IV ``horizon`` quote dates ahead and the info-date IV.

    Expects canonical columns plus ``date_idx`` (position of quote_date among sorted dates) and
    ``loo_iv``. Adds ``target_idx``, ``info_idx``, ``iv`` (target), ``persistence`` (the contract's
    IV on the info date) and ``prev_loo_iv`` (its neighbours' on the info date).
    """
    lag = 1 if horizon == 0 else 0
    key = [*CONTRACT, "date_idx"]
    iv = chain[key + ["implied_volatility", "loo_iv"]]
    rows = chain.copy()
    rows["target_idx"] = rows["date_idx"] + horizon
    rows["info_idx"] = rows["date_idx"] - lag
    target = iv.drop(columns="loo_iv").rename(columns={"date_idx": "target_idx", "implied_volatility": "iv"})
    rows = rows.merge(target, on=[*CONTRACT, "target_idx"], how="inner")
    prev = iv.rename(columns={"date_idx": "info_idx", "implied_volatility": "persistence", "loo_iv": "prev_loo_iv"})
    return rows.merge(prev, on=[*CONTRACT, "info_idx"], how="left")


QUOTE_COLUMNS = ["date_idx", "quote_date", *CONTRACT, "tau", "log_moneyness", "forward", "iv"]


class Built(NamedTuple):
    """What ``build_rows`` returns: the model rows, the chain's quotes (``QUOTE_COLUMNS``, what a surface fit on an
    information date starts from) and the report."""

    rows: pd.DataFrame
    quotes: pd.DataFrame
    report: dict
    spot: pd.Series  # per quote date of the chain (``daily_spot``), indexed by date


def enrich(chain: pd.DataFrame, dates: pd.DatetimeIndex | None = None, first_idx: int = 0) -> pd.DataFrame:
    """The chain sorted by quote date and contract, with ``date_idx`` (the quote date's position in ``dates``, by
    default the chain's own, plus ``first_idx``), ``tau`` (years to expiry from the quote date), ``forward`` and
    ``log_moneyness``, and rate and dividend yield (0 where absent)."""
    # sort_values' order, from one lexsort of the keys' arrays (a quote date's contracts are unique)
    keys = [pd.factorize(chain[c], sort=True)[0] if c == "option_type" else chain[c].to_numpy()
            for c in reversed(["quote_date", *CONTRACT])]
    order = np.lexsort(keys)
    chain = (chain if (order[1:] > order[:-1]).all() else chain.take(order)).reset_index(drop=True)
    for col in ("rate", "dividend_yield"):
        if col not in chain.columns:
            chain[col] = 0.0
    dates = pd.DatetimeIndex(np.sort(chain["quote_date"].unique())) if dates is None else dates
    chain["date_idx"] = dates.get_indexer(chain["quote_date"]) + first_idx
    if "time_to_expiry" in chain.columns:  # given by the data (e.g. with intraday expiry times)
        tau = chain["time_to_expiry"].to_numpy(np.float64)
    else:
        tau = calendar_days(chain["expiry"], chain["quote_date"]) / 365.0
    carry = np.exp((chain["rate"] - chain["dividend_yield"]).to_numpy() * tau)
    if "forward" in chain.columns:
        fwd = chain["forward"].to_numpy(np.float64)
        if "underlying_price" in chain.columns:
            fwd = np.where(np.isfinite(fwd), fwd, chain["underlying_price"].to_numpy() * carry)
    else:
        fwd = chain["underlying_price"].to_numpy(np.float64) * carry
    chain["forward"] = fwd
    chain["tau"] = tau
    chain["log_moneyness"] = np.log(chain["strike"] / fwd)
    chain["_spot"] = fwd / carry
    return chain


def calendar_days(later: pd.Series, earlier: pd.Series) -> np.ndarray:
    """``(later - earlier).dt.days`` of two date columns without missing dates, as an int64 array."""
    return (later.to_numpy() - earlier.to_numpy()) // np.timedelta64(1, "D")


def daily_spot(chain: pd.DataFrame) -> pd.Series:
    """Spot per ``date_idx``: the median spot implied by that date's forwards (the spot itself when given)."""
    return chain["_spot"].groupby(chain["date_idx"]).median()


def build_rows(chain: pd.DataFrame, *, horizon: int, fallback: str = "moneyness",
               spot_before: pd.Series | None = None, terms: tuple[int, int] | None = None) -> Built:
    """Canonical chain (IV filled) -> one row per (contract, terms date) with every feature, unscaled.

    Returns ``Built(rows, quotes, report)``. No feature of a row uses data after its terms date (surface data after
    its info date): tests/test_leakage.py changes later rows and checks that nothing moves. ``spot_before``: the spot
    (``daily_spot``) of the quote dates before the chain's, indexed by date, when the chain is a chunk of a longer
    history: its ``date_idx`` continue theirs, the spot-path features see that history as if the chain were one,
    and rows whose info date is before the chain's first count as ``drop_first_date``. ``terms``: build (and count,
    and return the quotes of) only the terms dates whose ``date_idx`` is in ``[lo, hi]``; the chain's other dates are
    there as information (the previous date) or targets.
    """
    if horizon < 0:
        raise ValueError(f"data.horizon must be >= 0, got {horizon}")
    if fallback not in feats.FALLBACKS:
        raise ValueError(f"data.fallback must be one of {', '.join(feats.FALLBACKS)}, got {fallback!r}")
    before = spot_before if spot_before is not None else pd.Series(dtype=np.float64, index=pd.DatetimeIndex([]))
    first = len(before)
    chain = enrich(chain, first_idx=first)
    spot = daily_spot(chain)
    dates = before.index.append(pd.DatetimeIndex(np.sort(chain["quote_date"].unique())))
    history = spot if not first else pd.concat([before.set_axis(np.arange(first)), spot])
    nodes = chain.drop(columns="_spot").rename(columns={"implied_volatility": "iv"})
    chain["loo_iv"] = feats.smile_leave_one_out(nodes)
    ctx = feats.Context(nodes=nodes, spot=spot, dates=dates, fallback=fallback, market=feats.market_state(history))

    drops: dict[str, int] = {}
    rows = add_lagged(chain.drop(columns="_spot"), horizon)
    if terms is not None:
        rows = rows[rows["date_idx"].between(*terms)].reset_index(drop=True)
        nodes = nodes[nodes["date_idx"].between(*terms)]
    drops["drop_no_target"] = len(nodes) - len(rows)
    no_info = rows["info_idx"] < first
    drops["drop_first_date"] = int(no_info.sum())
    rows = rows[~no_info].reset_index(drop=True)
    # Terms at the target date: tau runs to expiry from the date being predicted.
    rows["tau"] = rows["tau"] - (dates[rows["target_idx"].to_numpy()]
                                 - dates[rows["date_idx"].to_numpy()]).days.to_numpy() / 365.0
    rows = feats.compute(rows, ctx)
    rows["base"] = rows["prev_iv"]
    no_base = ~np.isfinite(rows["base"])
    drops["drop_no_previous_surface"] = int(no_base.sum())
    rows = rows[~no_base].reset_index(drop=True)
    used = dates[np.unique(nodes["date_idx"].to_numpy())]
    report = {"quotes": len(nodes), "quote_dates": len(used), "first_date": str(used[0].date()) if len(used) else "",
              "last_date": str(used[-1].date()) if len(used) else "", "dropped": drops,
              "rows_without_previous_quote": int(rows["prev_iv_missing"].sum())}
    rows.attrs["dates"] = dates
    return Built(rows, nodes[QUOTE_COLUMNS], report, spot.set_axis(dates[first:]))


@dataclass
class InfoDates:
    """What the rows of a date read from the quote dates before it when re-marking (``horizon=0``), built once from
    a canonical chain of those dates (``info_dates``) so that a service re-marking many requests against one previous
    surface computes it once; ``next_date_rows`` builds a date's rows from it.

    ``dates``: the earlier quote dates (``date_idx`` order); ``spot``: their ``daily_spot``; ``nodes``: the quotes of
    the last of them (the info date; ``build_rows``' nodes, ``iv`` the IV), with ``loo_iv`` (``smile_leave_one_out``)
    and ``state``: that date's ``surface_states`` row; ``node_tables``: the features' tables of ``nodes``
    (``features.Context.of_nodes``), filled by the first request and shared by the next.
    """

    dates: pd.DatetimeIndex
    spot: pd.Series
    nodes: pd.DataFrame
    state: pd.DataFrame
    node_tables: dict[str, Any] = field(default_factory=dict)

    def contract_rows(self, rows: pd.DataFrame) -> np.ndarray:
        """Per row of ``rows``, the position in ``nodes`` of its contract (-1: not quoted on the info date)."""
        if "contracts" not in self.node_tables:
            self.node_tables["contracts"] = {key: i for i, key in enumerate(_contract_keys(self.nodes))}
        positions = self.node_tables["contracts"]
        return np.array([positions.get(key, -1) for key in _contract_keys(rows)], dtype=np.int64)


def _contract_keys(df: pd.DataFrame) -> Iterator[tuple]:
    """Each row's contract as a key: its expiry (ns since the epoch), strike and option type."""
    return zip(df["expiry"].to_numpy("datetime64[ns]").view(np.int64).tolist(), df["strike"].tolist(),
               df["option_type"].tolist())


def info_dates(chain: pd.DataFrame) -> InfoDates:
    """``InfoDates`` of a canonical chain (IV filled) of the dates before the one to re-mark."""
    enriched = enrich(chain)
    dates = pd.DatetimeIndex(np.sort(enriched["quote_date"].unique()))
    last = enriched[enriched["date_idx"] == len(dates) - 1].reset_index(drop=True)
    # Each date's leave-one-out smile and surface state read that date's quotes only: the last date's alone are what
    # build_rows computes for it on the whole chain.
    nodes = last.drop(columns="_spot").rename(columns={"implied_volatility": "iv"})
    nodes["loo_iv"] = feats.smile_leave_one_out(nodes)
    return InfoDates(dates=dates, spot=daily_spot(enriched), nodes=nodes, state=feats.surface_states(nodes))


class DateRows(NamedTuple):
    """One date's rows re-marked from ``InfoDates`` (``next_date_columns``): ``chain`` the date's canonical rows as
    ``enrich`` gives them (sorted by contract), ``columns`` what ``build_rows`` adds to them, as arrays aligned with
    ``chain``: ``add_lagged``'s columns, every feature of ``REGISTRY`` and ``base`` (NaN: no previous surface)."""

    chain: pd.DataFrame
    columns: dict[str, np.ndarray]


def next_date_columns(info: InfoDates, chain: pd.DataFrame, *, fallback: str = "moneyness") -> DateRows:
    """The rows of ``chain`` (canonical quotes of one date after ``info.dates``) re-marked from ``info``
    (``horizon=0``), every row kept: ``next_date_rows`` without building the frame (what a served model reads)."""
    if fallback not in feats.FALLBACKS:
        raise ValueError(f"data.fallback must be one of {', '.join(feats.FALLBACKS)}, got {fallback!r}")
    if chain.empty:  # every quote of the date dropped by the loader
        return DateRows(chain, {c: np.empty(0) for c in [*LAGGED, *feats.REGISTRY, "base"]})
    day = chain["quote_date"].iloc[0]
    if not len(info.dates) or not (chain["quote_date"] == day).all() or day <= info.dates[-1]:
        raise ValueError(f"next_date_rows: the chain must hold one quote date after {info.dates[-1:].date}")
    dates = info.dates.append(pd.DatetimeIndex([day]))
    rows = enrich(chain, dates=dates)
    spot = pd.concat([info.spot, daily_spot(rows)])
    # the features read the rows as arrays: the enriched chain's, add_lagged's (each contract's quote on the info date
    # as add_lagged's merge finds it; the contracts of a date are unique) and the features above them
    columns: dict[str, Any] = {c: rows[c].to_numpy() for c in rows.columns if c != "_spot"}
    date_idx = columns["date_idx"]
    at = info.contract_rows(rows)
    found = at >= 0
    lagged = {"target_idx": date_idx, "info_idx": date_idx - 1, "iv": columns["implied_volatility"],
              **{name: np.where(found, info.nodes[col].to_numpy(np.float64)[at], np.nan)
                 for col, name in (("iv", "persistence"), ("loo_iv", "prev_loo_iv"))}}
    ctx = feats.Context(nodes=info.nodes, spot=spot, dates=dates, fallback=fallback, market=feats.market_state(spot),
                        state=info.state, node_tables=info.node_tables)
    new = {**lagged, **feats.compute_columns({**columns, **lagged}, ctx)}
    new["base"] = new["prev_iv"]
    return DateRows(rows.drop(columns="_spot"), new)


LAGGED = ["target_idx", "info_idx", "iv", "persistence", "prev_loo_iv"]  # add_lagged's columns


def next_date_rows(info: InfoDates, chain: pd.DataFrame, *, fallback: str = "moneyness") -> tuple[pd.DataFrame, int]:
    """The rows of ``chain`` (canonical quotes of one date after ``info.dates``) re-marked from ``info`` (``horizon=0``)
    and how many were dropped for want of a base (``drop_no_previous_surface``): each row and feature as
    ``build_rows`` gives it for that date on the whole chain (the earlier dates and this one), bit for bit
    (tests/test_serving.py), without redoing the earlier dates' work."""
    rows, new = next_date_columns(info, chain, fallback=fallback)
    # one frame: the chain's columns as they are (their dtypes), the new ones after them
    rows = pd.concat([rows.drop(columns=[c for c in new if c in rows.columns]), pd.DataFrame(new, index=rows.index)],
                     axis=1)
    no_base = ~np.isfinite(new["base"])
    return (rows[~no_base].reset_index(drop=True) if no_base.any() else rows), int(no_base.sum())


def split_rows(rows: pd.DataFrame, *, horizon: int, val_fraction: float, test_fraction: float,
               n_folds: int = 1, fold: int = 0, train_dates: int | None = None) -> dict[str, pd.DataFrame]:
    """Chronological train/val/test on the target date, with an embargo of ``horizon`` dates before val and test.

    Walk-forward: with ``n_folds > 1``, fold ``i`` moves the val and test windows back by
    ``(n_folds - 1 - i)`` test windows and trains on everything before (an expanding window);
    the last fold is the plain split. ``train_dates``: train on at most that many target dates before
    validation (a sliding window).
    """
    bounds = split_bounds(np.sort(rows["target_idx"].unique()), val_fraction=val_fraction,
                          test_fraction=test_fraction, n_folds=n_folds, fold=fold, train_dates=train_dates)
    return {k: rows[m] for k, m in split_masks(rows["target_idx"], bounds, horizon).items()}


def inner_folds(dates: np.ndarray, n_folds: int, fraction: float) -> list[np.ndarray]:
    """Blocks of consecutive dates (each an array of date ids) covering the last ``fraction`` of ``dates``' distinct
    values, for expanding walk-forward folds: fold ``i`` fits on every date before block ``i`` and predicts it."""
    udates = np.unique(dates)
    n_eval = max(n_folds, int(len(udates) * fraction))
    if len(udates) <= n_eval:
        return []
    return [b for b in np.array_split(udates[len(udates) - n_eval :], n_folds) if len(b)]


def split_bounds(udates: np.ndarray, *, val_fraction: float, test_fraction: float, n_folds: int = 1, fold: int = 0,
                 train_dates: int | None = None) -> tuple[int, int, int, int]:
    """``(train_start, train_end, val_end, test_end)`` target date indices of ``split_rows`` from the sorted target
    date indices ``udates`` of every row."""
    if not 0 <= fold < n_folds:
        raise ValueError(f"data.fold must be in [0, data.n_folds), got fold={fold}, n_folds={n_folds}")
    n = len(udates)
    n_test = max(1, int(round(n * test_fraction)))
    n_val = max(1, int(round(n * val_fraction)))
    end = n - (n_folds - 1 - fold) * n_test
    if end - n_test - n_val < 1:
        raise ValueError(
            f"too few quote dates ({n}) for val_fraction={val_fraction}, test_fraction={test_fraction}, "
            f"n_folds={n_folds}: need at least one train date; lower the fractions or n_folds"
        )
    train_end, val_end, test_end = udates[end - n_test - n_val - 1], udates[end - n_test - 1], udates[end - 1]
    if train_dates is not None and train_dates < 1:
        raise ValueError(f"data.train_dates must be >= 1 or null (expanding window), got {train_dates}")
    train_start = udates[max(0, end - n_test - n_val - train_dates)] if train_dates else udates[0]
    return train_start, train_end, val_end, test_end


def split_masks(t: pd.Series, bounds: tuple[int, int, int, int], horizon: int) -> dict[str, pd.Series]:
    """Row masks of train, val and test from the rows' target date indices ``t`` (see ``split_bounds``)."""
    train_start, train_end, val_end, test_end = bounds
    # Info for val/test rows must come after the last train target: drop `horizon` dates.
    return {
        "train": (t >= train_start) & (t <= train_end),
        "val": (t > train_end + horizon) & (t <= val_end),
        "test": (t > val_end + horizon) & (t <= test_end),
    }


def make_aux(df: pd.DataFrame) -> dict[str, torch.Tensor]:
    """Unscaled per-row values for losses (see ``Split.aux``)."""
    lm, tau, base = (df[c].to_numpy(np.float64) for c in ("log_moneyness", "tau", "base"))
    vega = bs_vega(1.0, np.exp(lm), tau, base, df["rate"].to_numpy(np.float64), unit="forward")
    f32 = lambda a: torch.tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
    return {
        "log_moneyness": f32(lm), "tau": f32(tau), "base": f32(base), "vega": f32(np.nan_to_num(vega)),
        "is_call": f32((df["option_type"] == "C").to_numpy()),
        "quote_date_idx": torch.tensor(df["target_idx"].to_numpy(np.int64)),
    }


def categorical_values(rows: pd.DataFrame, name: str) -> pd.Series:
    if name == "option_type":
        return rows["option_type"].astype(str)
    if name == "expiry_cycle":
        e = pd.DatetimeIndex(rows["expiry"])
        monthly = (e.weekday == 4) & (e.day >= 15) & (e.day <= 21)
        return pd.Series(np.where(monthly, "monthly", "weekly"), index=rows.index)
    if name == "underlying":
        if "underlying" not in rows.columns:
            raise ValueError("data.cat_features has 'underlying' but the table has no underlying column; "
                             "map one with data.columns.underlying=<your column> or remove it")
        return rows["underlying"].astype(str)
    raise ValueError(f"unknown categorical feature {name!r}; valid names: {', '.join(feats.CAT_FEATURES)}")


ROW_COLUMNS = ["quote_date", *CONTRACT, "target_date", "info_date", "target_idx", "info_idx", "tau", "log_moneyness",
               "forward", "delta", "rate", "dividend_yield"]
QUOTE_TERMS = ("bid", "ask", "iv_bid", "iv_ask")  # in Split.rows where the chain has them


def prepare(chain: pd.DataFrame, *, source: str = "chain", **pipeline: Any) -> Dataset:
    """Canonical chain (IV filled) -> ``Dataset``, in memory. No feature of a row uses data after its info date.

    ``pipeline``: the keys of ``prepare_chunks``.
    """
    return prepare_chunks([chain], source=source, **pipeline)


def prepare_chunks(chains: Iterable[pd.DataFrame], *, features: list[str], target: str, horizon: int,
                   val_fraction: float, test_fraction: float, source: str = "chain",
                   cat_features: list[str] | None = None, n_folds: int = 1, fold: int = 0,
                   fallback: str = "moneyness", train_dates: int | None = None, winsorize: float | None = None,
                   folder: Path | None = None) -> Dataset:
    """Canonical chains of consecutive quote dates, in date order (each date within one) -> ``Dataset``.

    The one pipeline: each chain's rows are built (``build_rows``) with the dates it needs from the chain before (the
    previous date's quotes, or the ``horizon`` dates whose targets it holds) and the whole spot history, so the rows
    are those of one chain; then the chronological split, train-only statistics added window by window
    (``TrainStats``) and the scaled splits. ``folder=None`` keeps everything in memory; with a folder, the rows wait in
    one Parquet file per chain and the splits' arrays (``x_num``, ``y``, ``rows``, ``aux``, ...) and the quotes are
    written chunk by chunk to files there and memory-mapped: a chain larger than memory never is in memory at once.

    ``winsorize``: clip the training targets (the change, or the level) to their ``winsorize`` and
    ``1 - winsorize`` quantiles on train; validation and test targets are never touched.
    """
    cat_features = list(cat_features or [])
    feats.validate_names(features, cat_features)
    if target not in ("level", "change"):
        raise ValueError(f"data.target must be 'level' or 'change', got {target!r}")
    store = RowStore(folder, keep=[*features, *ROW_COLUMNS, *QUOTE_TERMS, "iv", "base", "persistence",
                                   "dividend_yield", "underlying"])
    quotes = Sink(folder, "quotes")
    report: dict = {}
    target_idx: list[np.ndarray] = []
    dates, last_chain = pd.DatetimeIndex([]), None
    for built, last in windows(chains, horizon=horizon, fallback=fallback):
        rows, part, last_chain = built.rows, built.report, last
        dates = rows.attrs["dates"]  # every quote date so far
        rows["target_date"] = dates[rows["target_idx"].to_numpy()]
        rows["info_date"] = dates[rows["info_idx"].to_numpy()]
        missing = ~np.isfinite(rows[features].to_numpy(np.float64)).all(axis=1)
        part["dropped"]["drop_missing_feature"] = int(missing.sum())
        rows = rows[~missing].reset_index(drop=True)
        report = _add_reports(report, part)
        target_idx.append(np.unique(rows["target_idx"].to_numpy()))
        store.add(rows)
        quotes.add(built.quotes)
    if not store.n_rows:
        raise ValueError(f"{source}: no rows for the model (dropped: {report.get('dropped')})")
    udates = np.unique(np.concatenate(target_idx))
    report = {"source": source, **report, "rows": store.n_rows, "target_dates": len(udates), "horizon": horizon,
              "target": target}
    bounds = split_bounds(udates, val_fraction=val_fraction, test_fraction=test_fraction, n_folds=n_folds, fold=fold,
                          train_dates=train_dates)

    # Scaling and categorical vocabularies from the train part only.
    stats = TrainStats(features, cat_features, target)
    for rows in store.read(columns=[*features, "iv", "base", "persistence", "target_idx", *CONTRACT, "underlying"]):
        stats.add(rows[split_masks(rows["target_idx"], bounds, horizon)["train"]])
    fit = stats.fit(winsorize)
    if fit.note:
        report["winsorized"] = fit.note

    sinks = {k: Sink(folder, k) for k in ("train", "val", "test")}
    errors = {k: SquaredError() for k in sinks}
    for rows in store.read():
        row_columns = ROW_COLUMNS + [c for c in QUOTE_TERMS if c in rows.columns]
        for k, mask in split_masks(rows["target_idx"], bounds, horizon).items():
            part = rows[mask]
            sinks[k].add(fit.arrays(part, train=k == "train"), rows=part[row_columns])
            errors[k].add(part)
    splits = {k: sink.split() for k, sink in sinks.items()}
    # The baseline on every row: persistence, with the previous surface where the contract is new.
    report["splits"] = {
        k: {"rows": len(splits[k]), "dates": f"{dates[e.lo].date()}..{dates[e.hi].date()}" if len(splits[k]) else "-",
            "n_dates": e.n_dates, "baseline_rmse": round(e.rmse(), 4)}
        for k, e in errors.items()
    }
    report["features"] = list(features)
    return Dataset(**splits, feature_names=list(features), cat_cardinalities=[len(fit.vocab[c]) + 1 for c in cat_features],
                   target=target, y_center=fit.center, y_scale=fit.scale, x_mean=fit.x_mean, x_std=fit.x_std,
                   report=report, cat_features=cat_features, cat_vocab=fit.vocab, quotes=quotes.frame(),
                   horizon=horizon, last_chain=last_chain)


def by_dates(chain: pd.DataFrame, max_rows: int) -> Iterator[pd.DataFrame]:
    """``chain`` in consecutive pieces of whole quote dates, each of at most ``max_rows`` rows (or one date)."""
    dates, counts = np.unique(chain["quote_date"].to_numpy(), return_counts=True)
    if counts.sum() <= max_rows:
        yield chain
        return
    starts = [0]
    size = 0
    for i, n in enumerate(counts):
        if size and size + n > max_rows:
            starts.append(i)
            size = 0
        size += n
    for a, b in zip(starts, [*starts[1:], len(dates)]):
        yield chain[chain["quote_date"].isin(dates[a:b])].reset_index(drop=True)


def windows(chains: Iterable[pd.DataFrame], *, horizon: int, fallback: str) -> Iterator[tuple[Built, pd.DataFrame]]:
    """``build_rows`` of each chain with what it needs of the chains before: a window is the chain after the
    dates carried from the last one (the info date of its first rows, and the last ``horizon`` dates, whose targets
    are in this chain), and rows are built for the terms dates not yet built, up to the last whose target the
    window holds (every date at the end). The spot history before the window goes along (``spot_before``). Yields
    each window's ``Built`` and its last date's canonical chain."""
    lag = 1 if horizon == 0 else 0
    chunks = (c for c in chains if len(c))
    current = next(chunks, None)
    carry: pd.DataFrame | None = None
    spot_before = pd.Series(dtype=np.float64, index=pd.DatetimeIndex([]))
    next_terms, last_date = 0, None
    while current is not None:
        upcoming = next(chunks, None)
        first_date = current["quote_date"].min()
        if last_date is not None and first_date <= last_date:
            raise ValueError(f"quote dates out of order across chunks: a chunk starts on {first_date.date()}, on or "
                             f"before the previous chunk's last date {last_date.date()}; a chunked pipeline needs "
                             "files in date order with each quote date in one file (e.g. one file per date or year, "
                             "named so that they sort by date)")
        last_date = current["quote_date"].max()
        window = current if carry is None else pd.concat([carry, current], ignore_index=True)
        del current
        n_dates = window["quote_date"].nunique()
        first = len(spot_before)
        final = upcoming is None
        hi = first + n_dates - 1 - (0 if final else horizon)
        terms = None if (final and carry is None) else (next_terms, hi)
        built = build_rows(window, horizon=horizon, fallback=fallback, spot_before=spot_before, terms=terms)
        next_terms = max(hi, next_terms - 1) + 1
        keep = next_terms - lag - first  # window dates from here are carried into the next window
        window_dates = built.spot.index
        if not final:
            carry = window[window["quote_date"] >= window_dates[keep]] if keep < n_dates else None
            spot_before = pd.concat([spot_before, built.spot.iloc[:keep]]) if len(spot_before) else built.spot.iloc[:keep]
        yield built, last_date_chain(window)
        current = upcoming


def _add_reports(total: dict, part: dict) -> dict:
    """Two windows' ``build_rows`` reports as one (counts added, the date range spanned)."""
    if not total:
        return part
    return {"quotes": total["quotes"] + part["quotes"], "quote_dates": total["quote_dates"] + part["quote_dates"],
            "first_date": total["first_date"] if total["quote_dates"] else part["first_date"],
            "last_date": part["last_date"] if part["quote_dates"] else total["last_date"],
            "dropped": {k: total["dropped"].get(k, 0) + v for k, v in part["dropped"].items()},
            "rows_without_previous_quote": total["rows_without_previous_quote"] + part["rows_without_previous_quote"]}


class TrainStats:
    """Train-only statistics added a part of the train rows at a time: the features' mean, standard deviation and
    root mean square (pandas' own on one part; combined by Chan's update across parts), the targets (kept: one
    float a train row, for exact quantiles) with whether each row's contract is new on its date (no persistence),
    and the categorical vocabularies."""

    def __init__(self, features: list[str], cat_features: list[str], target: str):
        self.features, self.cat_features, self.target = features, cat_features, target
        self.parts: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        self.raw_y: list[pd.Series] = []
        self.new: list[np.ndarray] = []
        self.iv: list[pd.Series] = []
        self.vocab: dict[str, set[str]] = {c: set() for c in cat_features}

    def add(self, train: pd.DataFrame) -> None:
        if not len(train):
            return
        x = train[self.features]
        self.parts.append((len(x), x.mean().to_numpy(), x.std().to_numpy(), (x**2).mean().to_numpy()))
        self.raw_y.append(train["iv"] - (train["base"] if self.target == "change" else 0.0))
        self.new.append(train["persistence"].isna().to_numpy())
        if self.target == "level":
            self.iv.append(train["iv"])
        for c in self.cat_features:
            self.vocab[c].update(categorical_values(train, c).unique())

    def moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean, standard deviation (ddof 1) and mean square of each feature over every part."""
        if len(self.parts) == 1:
            return self.parts[0][1:]
        n = np.array([p[0] for p in self.parts], dtype=np.float64)[:, None]
        means, stds, squares = (np.stack([p[i] for p in self.parts]) for i in (1, 2, 3))
        total = n.sum()
        mean = (n * means).sum(axis=0) / total
        m2 = (np.where(n > 1, (n - 1) * stds**2, 0.0) + n * (means - mean) ** 2).sum(axis=0)
        return mean, np.sqrt(m2 / (total - 1)) if total > 1 else np.full_like(mean, np.nan), (n * squares).sum(0) / total

    def fit(self, winsorize: float | None) -> Scaling:
        mean, std, square = self.moments()
        uncentered = np.array([f in feats.UNCENTERED for f in self.features], dtype=bool)
        x_mean = np.where(uncentered, 0.0, mean)
        x_std = np.where(uncentered, np.sqrt(square), std)
        x_std = np.where(np.isfinite(x_std) & (x_std > 0), x_std, 1.0)
        raw_y = self.raw_y[0] if len(self.raw_y) == 1 else pd.concat(self.raw_y, ignore_index=True)
        new = np.concatenate(self.new)
        clip, clip_new, note = (-np.inf, np.inf), (-np.inf, np.inf), ""
        if winsorize:
            if not 0 < winsorize < 0.5:
                raise ValueError(f"data.winsorize must be in (0, 0.5) or null, got {winsorize}")
            # each kind its own quantiles: the change of a new contract (over the previous surface) is typically
            # several times a quoted contract's (over its own IV); pooled quantiles clip new contracts' real moves
            clip, clip_new = (_quantiles(raw_y[kind], winsorize) for kind in (~new, new))
        clipped = raw_y.clip(*kind_bounds(new, clip, clip_new))
        if winsorize:
            note = (f"{int((clipped != raw_y).sum()):,} train targets clipped to their {winsorize:g}/{1 - winsorize:g} quantiles, each "
                    f"kind its own: previously quoted [{clip[0] * VOL_POINTS:+.2f}, {clip[1] * VOL_POINTS:+.2f}], "
                    f"new contracts [{clip_new[0] * VOL_POINTS:+.2f}, {clip_new[1] * VOL_POINTS:+.2f}] vol pts "
                    "(train only)")
        if self.target == "change":
            center, scale = 0.0, float(clipped.std() or 1.0)
        else:
            iv = self.iv[0] if len(self.iv) == 1 else pd.concat(self.iv, ignore_index=True)
            center, scale = float(iv.mean()), float(iv.std() or 1.0)
        vocab = {c: sorted(v) for c, v in self.vocab.items()}
        return Scaling(self.features, self.cat_features, self.target, x_mean, x_std, clip, clip_new, center, scale, vocab,
                       note)


def kind_bounds(new: np.ndarray, prev: tuple[float, float], new_bounds: tuple[float, float]) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """Per-row (lower, upper) bounds: ``new_bounds`` on the rows of contracts new on their date (``new``), ``prev``
    on the others (previously quoted)."""
    return np.where(new, new_bounds[0], prev[0]), np.where(new, new_bounds[1], prev[1])


def _quantiles(y: pd.Series, q: float) -> tuple[float, float]:
    """The ``q`` and ``1 - q`` quantiles of ``y``; unbounded without rows."""
    if not len(y):
        return -np.inf, np.inf
    lo, hi = (float(v) for v in y.quantile([q, 1 - q]))
    return lo, hi


@dataclass
class Scaling:
    """Train-fit scaling of features and target, and the categorical vocabularies (index 0: unseen in train)."""

    features: list[str]
    cat_features: list[str]
    target: str
    x_mean: np.ndarray
    x_std: np.ndarray
    clip: tuple[float, float]  # train targets of previously quoted contracts
    clip_new: tuple[float, float]  # of contracts new on their date (no persistence)
    center: float
    scale: float
    vocab: dict[str, list[str]]
    note: str = ""

    def arrays(self, df: pd.DataFrame, *, train: bool) -> dict[str, Any]:
        """A split's rows as its arrays: ``x_num`` (n, n_num) float32, ``x_cat`` (n, n_cat) int64 or None, ``y``
        float32 (train targets clipped), ``iv``, ``base``, ``persistence`` and the ``aux`` values (see ``Split``)."""
        y = df["iv"] - (df["base"] if self.target == "change" else 0.0)
        if train:
            y = y.clip(*kind_bounds(df["persistence"].isna().to_numpy(), self.clip, self.clip_new))
        x = (df[self.features].to_numpy() - self.x_mean) / self.x_std
        y = (y - self.center) / self.scale
        x_cat = None
        if self.cat_features:
            x_cat = np.column_stack([
                pd.Categorical(categorical_values(df, c), categories=self.vocab[c]).codes.astype(np.int64) + 1
                for c in self.cat_features
            ]).reshape(len(df), len(self.cat_features))
        return {"x_num": x.astype(np.float32), "x_cat": x_cat, "y": y.to_numpy().astype(np.float32),
                "iv": df["iv"].to_numpy(), "base": df["base"].to_numpy(), "persistence": df["persistence"].to_numpy(),
                **{f"aux_{k}": v.numpy() for k, v in make_aux(df).items()}}


class SquaredError:
    """A split's baseline error (``base`` against ``iv``) and target date range, added window by window."""

    def __init__(self) -> None:
        self.parts: list[tuple[int, float]] = []
        self.lo, self.hi = -1, -1
        self.dates: set[int] = set()

    def add(self, part: pd.DataFrame) -> None:
        if not len(part):
            return
        self.parts.append((len(part), float(np.mean((part["base"] - part["iv"]) ** 2))))
        t = part["target_idx"]
        self.lo = int(t.min()) if self.lo < 0 else self.lo
        self.hi = int(t.max())
        self.dates.update(np.unique(t.to_numpy()).tolist())

    @property
    def n_dates(self) -> int:
        return len(self.dates)

    def rmse(self) -> float:
        if not self.parts:
            return float("nan")
        mse = self.parts[0][1] if len(self.parts) == 1 else sum(n * m for n, m in self.parts) / sum(n for n, _ in self.parts)
        return float(np.sqrt(mse) * VOL_POINTS)


class RowStore:
    """Each window's rows, kept as they are (in memory) or, with a folder, the columns the pipeline still needs
    (``keep``) in one Parquet file a window, read back window by window."""

    def __init__(self, folder: Path | None, keep: list[str]):
        self.folder, self.keep = folder, keep
        self.items: list[pd.DataFrame | tuple[Path, list[str]]] = []
        self.n_rows = 0

    def add(self, rows: pd.DataFrame) -> None:
        self.n_rows += len(rows)
        if self.folder is None:
            self.items.append(rows)
            return
        columns = [c for c in dict.fromkeys(self.keep) if c in rows.columns]
        path = Path(self.folder) / f"rows-{len(self.items):05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame = rows[columns]
        frame.attrs = {}  # the quote dates: not a Parquet attribute
        frame.to_parquet(path, index=False)
        self.items.append((path, columns))

    def read(self, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        for item in self.items:
            if isinstance(item, pd.DataFrame):
                yield item
            else:
                path, have = item
                yield pd.read_parquet(path, columns=None if columns is None else [c for c in have if c in columns])


class Sink:
    """A split's arrays and rows (or the quotes), added window by window: kept in memory, or appended to one raw
    file per column in a folder and memory-mapped at the end (copy-on-write: pages are read from disk when used)."""

    def __init__(self, folder: Path | None, name: str):
        self.folder = None if folder is None else Path(folder) / name
        self.parts: list[tuple[dict[str, Any], pd.DataFrame | None]] = []
        self.meta: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        self.categories: dict[str, list[str]] = {}

    def add(self, arrays: dict[str, Any] | pd.DataFrame, rows: pd.DataFrame | None = None) -> None:
        if isinstance(arrays, pd.DataFrame):
            arrays, rows = {}, arrays
        if self.folder is None:
            self.parts.append((arrays, rows))
            return
        columns = {k: v for k, v in arrays.items() if v is not None}
        for c in [] if rows is None else list(rows.columns):
            values = rows[c]  # type: ignore[index]
            if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_datetime64_dtype(values):
                columns[f"rows.{c}"] = values.to_numpy()
            else:  # strings (option_type): codes of categories in order of appearance
                known = self.categories.setdefault(c, [])
                known.extend(sorted(set(values.unique()) - set(known)))
                columns[f"rows.{c}"] = pd.Categorical(values, categories=known).codes.astype(np.int32)
        self.folder.mkdir(parents=True, exist_ok=True)
        for k, a in columns.items():
            a = np.ascontiguousarray(a)
            dtype, inner, n = self.meta.get(k, (a.dtype, a.shape[1:], 0))
            with open(self.folder / f"{k}.bin", "ab") as f:
                a.tofile(f)
            self.meta[k] = (dtype, inner, n + len(a))

    def columns(self) -> tuple[dict[str, Any], pd.DataFrame]:
        """Every array (concatenated, or memory-mapped) and the rows as one frame."""
        if self.folder is None:
            if len(self.parts) == 1:
                arrays, rows = self.parts[0]
                frame = pd.DataFrame() if rows is None else rows.reset_index(drop=True)
            else:
                arrays = {k: None if self.parts[0][0][k] is None else np.concatenate([p[0][k] for p in self.parts])
                          for k in self.parts[0][0]}
                frame = pd.concat([p[1] for p in self.parts if p[1] is not None], ignore_index=True)
            frame.attrs = {}  # the pipeline's quote dates stay with the pipeline (pd.concat compares attrs)
            return arrays, frame
        mapped = {}
        for k, (dtype, inner, n) in self.meta.items():
            shape = (n, *inner)
            mapped[k] = np.memmap(self.folder / f"{k}.bin", dtype=dtype, mode="c", shape=shape) if n else np.empty(shape, dtype)
        arrays = {k: v for k, v in mapped.items() if not k.startswith("rows.")}
        data = {}
        for k, v in mapped.items():
            if k.startswith("rows."):
                c = k.removeprefix("rows.")
                v = v.view(np.ndarray)  # still the mapped pages
                data[c] = pd.Categorical.from_codes(v, categories=self.categories[c]) if c in self.categories else v
        return arrays, pd.DataFrame(data, copy=False)

    def frame(self) -> pd.DataFrame:
        return self.columns()[1]

    def split(self) -> Split:
        a, rows = self.columns()
        t = torch.from_numpy
        x_cat = a.get("x_cat")
        return Split(x_num=t(a["x_num"]), x_cat=None if x_cat is None else t(x_cat), y=t(a["y"]), iv=a["iv"],
                     base=a["base"], persistence=a["persistence"], rows=rows,
                     aux={k.removeprefix("aux_"): t(v) for k, v in a.items() if k.startswith("aux_")})


def last_date_chain(chain: pd.DataFrame) -> pd.DataFrame:
    """The canonical chain rows of the last quote date (the surface the next date is re-marked from)."""
    return chain[chain["quote_date"] == chain["quote_date"].max()].reset_index(drop=True)


PIPELINE_KEYS = ("features", "target", "horizon", "val_fraction", "test_fraction", "cat_features", "n_folds", "fold",
                 "fallback", "train_dates", "winsorize")


def check_pipeline_keys(pipeline: dict) -> None:
    """Every key is an option of ``prepare`` (a misspelled data option stops here, naming the valid ones); the
    feature list becomes a plain list."""
    unknown = sorted(set(pipeline) - set(PIPELINE_KEYS))
    if "features" in pipeline:
        pipeline["features"] = list(pipeline["features"])
    if unknown:
        raise TypeError(f"unknown data option(s) {unknown}; the pipeline takes {', '.join(PIPELINE_KEYS)} and the "
                        "loader the keys of vforge.data.chain.ChainOptions")


def format_report(report: dict) -> str:
    """The data report as readable lines: what was loaded, what was dropped and why, the split."""
    lines = [f"data report: {report.get('source', '?')}"]
    if "quotes" in report:
        lines.append(f"  quotes used            {report['quotes']:>10,} on {report['quote_dates']:,} quote dates "
                     f"({report.get('first_date')}..{report.get('last_date')})")
    if "loaded" in report:
        lines.insert(1, f"  rows loaded            {report['loaded']:>10,}")
    dropped = {k: v for k, v in report.get("dropped", {}).items() if v}
    lines.append(f"  rows dropped           {sum(dropped.values()):>10,}")
    for k, v in sorted(dropped.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {v:>10,}  {DROP_REASONS.get(k, k)}")
    if "rows" in report:
        lines.append(f"  rows for the model     {report['rows']:>10,} (target {report.get('target')}, horizon "
                     f"{report.get('horizon')}; {report.get('rows_without_previous_quote', 0):,} without a previous "
                     "quote of the contract, based on the previous surface)")
    for col, note in report.get("assumed", {}).items():
        lines.append(f"  {col:<22} {note}")
    if "winsorized" in report:
        lines.append(f"  winsorized             {report['winsorized']}")
    for k, v in report.get("splits", {}).items():
        lines.append(f"    {k:<6}{v['rows']:>10,}  {v['dates']} ({v.get('n_dates', '?')} dates)  baseline RMSE "
                     f"{v.get('baseline_rmse', float('nan')):.3f} vol pts (persistence, else the previous surface)")
    return "\n".join(lines)
