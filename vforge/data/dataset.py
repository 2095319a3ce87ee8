"""From a canonical chain table to train/val/test tensors: features, targets, split, scaling.

The one pipeline every data option goes through (see DESIGN.md, "The data contract"):
``build_rows`` turns quotes into rows (features as of the info date, target ``horizon`` quote dates
ahead, the base a change is added to), ``split_rows`` cuts them chronologically with an embargo,
and ``prepare`` scales them on train only and makes tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

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


def enrich(chain: pd.DataFrame, dates: pd.DatetimeIndex | None = None, first_idx: int = 0) -> pd.DataFrame:
    """The chain sorted by quote date and contract, with ``date_idx`` (the quote date's position in ``dates``, by
    default the chain's own, plus ``first_idx``), ``tau`` (years to expiry from the quote date), ``forward`` and
    ``log_moneyness``, and rate and dividend yield (0 where absent)."""
    chain = chain.sort_values(["quote_date", *CONTRACT]).reset_index(drop=True)
    for col in ("rate", "dividend_yield"):
        if col not in chain.columns:
            chain[col] = 0.0
    dates = pd.DatetimeIndex(np.sort(chain["quote_date"].unique())) if dates is None else dates
    chain["date_idx"] = dates.get_indexer(chain["quote_date"]) + first_idx
    if "time_to_expiry" in chain.columns:  # given by the data (e.g. with intraday expiry times)
        tau = chain["time_to_expiry"].to_numpy(np.float64)
    else:
        tau = (chain["expiry"] - chain["quote_date"]).dt.days.to_numpy() / 365.0
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


def daily_spot(chain: pd.DataFrame) -> pd.Series:
    """Spot per ``date_idx``: the median spot implied by that date's forwards (the spot itself when given)."""
    return chain["_spot"].groupby(chain["date_idx"]).median()


def build_rows(chain: pd.DataFrame, *, horizon: int, fallback: str = "moneyness",
               spot_before: pd.Series | None = None) -> Built:
    """Canonical chain (IV filled) -> one row per (contract, terms date) with every feature, unscaled.

    Returns ``Built(rows, quotes, report)``. No feature of a row uses data after its terms date (surface data after
    its info date): tests/test_leakage.py changes later rows and checks that nothing moves. ``spot_before``: the spot
    (``daily_spot``) of the quote dates before the chain's, indexed by date, when the chain is a chunk of a longer
    history: its ``date_idx`` continue theirs, the spot-path features see that history as if the chain were one,
    and rows whose info date is before the chain's first count as ``drop_first_date``.
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
    drops["drop_no_target"] = len(chain) - len(rows)
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
    used = dates[first:]
    report = {"quotes": len(chain), "quote_dates": len(used), "first_date": str(used[0].date()),
              "last_date": str(used[-1].date()), "dropped": drops,
              "rows_without_previous_quote": int(rows["prev_iv_missing"].sum())}
    rows.attrs["dates"] = dates
    return Built(rows, nodes[QUOTE_COLUMNS], report)


def split_rows(rows: pd.DataFrame, *, horizon: int, val_fraction: float, test_fraction: float,
               n_folds: int = 1, fold: int = 0, train_dates: int | None = None) -> dict[str, pd.DataFrame]:
    """Chronological train/val/test on the target date, with an embargo of ``horizon`` dates before val and test.

    Walk-forward: with ``n_folds > 1``, fold ``i`` moves the val and test windows back by
    ``(n_folds - 1 - i)`` test windows and trains on everything before (an expanding window);
    the last fold is the plain split. ``train_dates``: train on at most that many target dates before
    validation (a sliding window).
    """
    if not 0 <= fold < n_folds:
        raise ValueError(f"data.fold must be in [0, data.n_folds), got fold={fold}, n_folds={n_folds}")
    udates = np.sort(rows["target_idx"].unique())
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
    t = rows["target_idx"]
    # Info for val/test rows must come after the last train target: drop `horizon` dates.
    return {
        "train": rows[(t >= train_start) & (t <= train_end)],
        "val": rows[(t > train_end + horizon) & (t <= val_end)],
        "test": rows[(t > val_end + horizon) & (t <= test_end)],
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


def _no_attrs(df: pd.DataFrame) -> pd.DataFrame:
    df.attrs = {}  # the pipeline's quote dates stay with the pipeline (pd.concat compares attrs)
    return df


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


def prepare(chain: pd.DataFrame, *, features: list[str], target: str, horizon: int, val_fraction: float,
            test_fraction: float, source: str = "chain", cat_features: list[str] | None = None,
            n_folds: int = 1, fold: int = 0, fallback: str = "moneyness", train_dates: int | None = None,
            winsorize: float | None = None) -> Dataset:
    """Canonical chain (IV filled) -> ``Dataset``. No feature of a row uses data after its info date.

    ``winsorize``: clip the training targets (the change, or the level) to their ``winsorize`` and
    ``1 - winsorize`` quantiles on train; validation and test targets are never touched.
    """
    cat_features = list(cat_features or [])
    feats.validate_names(features, cat_features)
    if target not in ("level", "change"):
        raise ValueError(f"data.target must be 'level' or 'change', got {target!r}")
    rows, quotes, report = build_rows(chain, horizon=horizon, fallback=fallback)
    dates = rows.attrs["dates"]
    rows["target_date"] = dates[rows["target_idx"].to_numpy()]
    rows["info_date"] = dates[rows["info_idx"].to_numpy()]
    missing = ~np.isfinite(rows[features].to_numpy(np.float64)).all(axis=1)
    report["dropped"]["drop_missing_feature"] = int(missing.sum())
    rows = rows[~missing].reset_index(drop=True)
    report = {"source": source, **report, "rows": len(rows), "target_dates": int(rows["target_idx"].nunique()),
              "horizon": horizon, "target": target}
    parts = split_rows(rows, horizon=horizon, val_fraction=val_fraction, test_fraction=test_fraction,
                       n_folds=n_folds, fold=fold, train_dates=train_dates)
    row_columns = ["quote_date", *CONTRACT, "target_date", "info_date", "target_idx", "info_idx", "tau",
                   "log_moneyness", "forward", "delta", "rate", "dividend_yield"]
    row_columns += [c for c in ("bid", "ask", "iv_bid", "iv_ask") if c in rows.columns]

    # Scaling and categorical vocabularies from the train part only.
    train = parts["train"]
    uncentered = np.array([f in feats.UNCENTERED for f in features], dtype=bool)
    x_mean = np.where(uncentered, 0.0, train[features].mean().to_numpy())
    rms = np.sqrt((train[features] ** 2).mean().to_numpy())
    x_std = np.where(uncentered, rms, train[features].std().to_numpy())
    x_std = np.where(np.isfinite(x_std) & (x_std > 0), x_std, 1.0)
    raw_y = train["iv"] - (train["base"] if target == "change" else 0.0)
    clip = (-np.inf, np.inf)
    if winsorize:
        if not 0 < winsorize < 0.5:
            raise ValueError(f"data.winsorize must be in (0, 0.5) or null, got {winsorize}")
        lo_q, hi_q = (float(q) for q in raw_y.quantile([winsorize, 1 - winsorize]))
        clip = (lo_q, hi_q)
        n_clipped = int(((raw_y < clip[0]) | (raw_y > clip[1])).sum())
        report["winsorized"] = (f"{n_clipped:,} train targets clipped to their {winsorize:g}/{1 - winsorize:g} "
                                f"quantiles [{clip[0] * VOL_POINTS:+.2f}, {clip[1] * VOL_POINTS:+.2f}] vol pts (train only)")
    if target == "change":
        center, scale = 0.0, float(raw_y.clip(*clip).std() or 1.0)
    else:
        center, scale = float(train["iv"].mean()), float(train["iv"].std() or 1.0)
    vocab = {c: sorted(categorical_values(train, c).unique()) for c in cat_features}

    def make(df: pd.DataFrame, clip: tuple[float, float] = (-np.inf, np.inf)) -> Split:
        x = (df[features].to_numpy() - x_mean) / x_std
        y = ((df["iv"] - (df["base"] if target == "change" else 0.0)).clip(*clip) - center) / scale
        x_cat = None
        if cat_features:  # 0 = a category unseen in train
            x_cat = torch.tensor(np.column_stack([
                pd.Categorical(categorical_values(df, c), categories=vocab[c]).codes.astype(np.int64) + 1
                for c in cat_features
            ]).reshape(len(df), len(cat_features)))
        return Split(
            x_num=torch.as_tensor(x, dtype=torch.float32), x_cat=x_cat,
            y=torch.tensor(y.to_numpy(), dtype=torch.float32),
            iv=df["iv"].to_numpy(), base=df["base"].to_numpy(), persistence=df["persistence"].to_numpy(),
            rows=df[row_columns].reset_index(drop=True).pipe(_no_attrs), aux=make_aux(df),
        )

    splits = {k: make(v, clip if k == "train" else (-np.inf, np.inf)) for k, v in parts.items()}
    # The baseline on every row: persistence, with the previous surface where the contract is new.
    base_rmse = lambda v: float(np.sqrt(np.mean((v["base"] - v["iv"]) ** 2)) * VOL_POINTS) if len(v) else float("nan")  # noqa: E731
    report["splits"] = {
        k: {"rows": len(v), "dates": f"{dates[v['target_idx'].min()].date()}..{dates[v['target_idx'].max()].date()}"
            if len(v) else "-", "n_dates": int(v["target_idx"].nunique()), "baseline_rmse": round(base_rmse(v), 4)}
        for k, v in parts.items()
    }
    report["features"] = list(features)
    return Dataset(**splits, feature_names=list(features), cat_cardinalities=[len(vocab[c]) + 1 for c in cat_features],
                   target=target, y_center=center, y_scale=scale, x_mean=x_mean, x_std=x_std, report=report,
                   cat_features=cat_features, cat_vocab=vocab, quotes=quotes.reset_index(drop=True),
                   horizon=horizon, last_chain=last_date_chain(chain))


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
