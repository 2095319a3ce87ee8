"""From a canonical chain table to train/val/test tensors: features, targets, split, scaling.

The one pipeline every data option goes through (see DESIGN.md, "The data contract"):
``build_rows`` turns quotes into rows (features as of the info date, target ``horizon`` quote dates
ahead, the base a change is added to), ``split_rows`` cuts them chronologically with an embargo,
and ``prepare`` scales them on train only and makes tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from vforge.data import features as F
from vforge.data.iv import bs_delta
from vforge.data.target import to_level

CONTRACT = ["expiry", "strike", "option_type"]

# Report keys of rows the pipeline drops, and what they mean (printed by ``format_report``).
DROP_REASONS = {
    "drop_first_date": "first quote date: no previous date to take features from",
    "drop_no_target": "no quote of the contract `horizon` quote dates later",
    "drop_no_previous_surface": "no quote of the same option type on the previous date (no base)",
    "drop_missing_feature": "a selected feature is missing",
}


@dataclass
class Split:
    """One chronological part of the data.

    ``x_num`` (n, n_num) float32 scaled features; ``x_cat`` (n, n_cat) int64 or None;
    ``y`` (n,) float32 the model's target (scaled); ``iv`` (n,) the target IV level (decimal);
    ``base`` (n,) what a predicted change is added to; ``persistence`` (n,) the contract's own
    previous IV (NaN where it was not quoted); ``rows`` the identifying columns (``quote_date``, the terms date, and
    the contract) and the terms evaluation needs: ``target_date``, ``info_date``, ``target_idx``, ``info_idx``,
    ``tau``, ``log_moneyness``, ``forward``, ``delta``, ``rate`` and, where the chain has them, ``bid``, ``ask``,
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


FALLBACKS = ("strike", "moneyness")


def previous_surface(rows: pd.DataFrame, nodes: pd.DataFrame, spot: pd.Series, sticky: str = "strike") -> np.ndarray:
    """For each row, the info date's smile of the same option type at the contract's strike and expiry.

    ``sticky="strike"``, like the contract's own previous quote: the query point is
    ``(ln(K / F_info(T)), T)`` with ``T`` the expiry's time from the info date and ``F_info`` the
    info date's spot carried forward. ``sticky="moneyness"``: the row's own log-moneyness and time
    to expiry (better across long gaps, where the spot has moved far). See ``features.surface_at``.
    NaN where the info date has no quote of that type.

    Args:
        nodes: the chain with ``date_idx, tau, log_moneyness`` and IVs in ``iv``.
    """
    out = np.full(len(rows), np.nan)
    cols = [nodes[c].to_numpy(np.float64) for c in ("tau", "log_moneyness", "iv")]
    groups = nodes.groupby(["date_idx", "option_type"], sort=False).indices
    info_dates = nodes.groupby("date_idx")["quote_date"].first()
    for (info, opt), pos in rows.groupby(["info_idx", "option_type"], sort=False).indices.items():
        sel = groups.get((info, opt))
        if sel is None:
            continue
        g = rows.iloc[pos]
        if sticky == "moneyness":
            k, tau = g["log_moneyness"].to_numpy(np.float64), g["tau"].to_numpy(np.float64)
        else:
            tau = (pd.DatetimeIndex(g["expiry"]) - info_dates[info]).days.to_numpy() / 365.0
            fwd = spot[info] * np.exp((g["rate"] - g["dividend_yield"]).to_numpy() * tau)
            k = np.log(g["strike"].to_numpy() / fwd)
        out[pos] = F.surface_at_arrays(cols[0][sel], cols[1][sel], cols[2][sel], k, np.maximum(tau, 1e-6))
    return out


QUOTE_COLUMNS = ["date_idx", "quote_date", *CONTRACT, "tau", "log_moneyness", "forward", "iv"]


def build_rows(chain: pd.DataFrame, *, horizon: int, fallback: str = "moneyness",
               quotes: list[pd.DataFrame] | None = None) -> tuple[pd.DataFrame, dict]:
    """Canonical chain (IV filled) -> one row per (contract, terms date) with every feature, unscaled.

    Returns ``rows, report``; ``quotes``, a list, receives the chain's quotes in ``QUOTE_COLUMNS``. No feature of a row uses data after its terms date (surface data after
    its info date): tests/test_leakage.py changes later rows and checks that nothing moves.
    """
    if horizon < 0:
        raise ValueError(f"data.horizon must be >= 0, got {horizon}")
    if fallback not in FALLBACKS:
        raise ValueError(f"data.fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
    chain = chain.sort_values(["quote_date", *CONTRACT]).reset_index(drop=True)
    for col in ("rate", "dividend_yield"):
        if col not in chain.columns:
            chain[col] = 0.0
    dates = pd.DatetimeIndex(np.sort(chain["quote_date"].unique()))
    chain["date_idx"] = dates.get_indexer(chain["quote_date"])
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
    # Spot per quote date: the median spot implied by that date's forwards (the spot itself when given).
    spot = pd.Series(fwd / carry).groupby(chain["date_idx"]).median()
    chain = chain.join(F.market_state(spot), on="date_idx")
    nodes = chain.rename(columns={"implied_volatility": "iv"})
    if quotes is not None:
        quotes.append(nodes[QUOTE_COLUMNS])
    chain["loo_iv"] = F.smile_leave_one_out(nodes)
    state = F.surface_states(nodes)

    drops: dict[str, int] = {}
    rows = add_lagged(chain, horizon)
    drops["drop_no_target"] = len(chain) - len(rows)
    first = rows["info_idx"] < 0
    drops["drop_first_date"] = int(first.sum())
    rows = rows[~first].reset_index(drop=True)
    target_dates = dates[rows["target_idx"].to_numpy()]
    # Terms at the target date: tau runs to expiry from the date being predicted.
    rows["tau"] = rows["tau"] - (target_dates - dates[rows["date_idx"].to_numpy()]).days.to_numpy() / 365.0
    rows["sqrt_tau"] = np.sqrt(rows["tau"])
    rows["is_call"] = (rows["option_type"] == "C").astype(float)
    rows["gap_days"] = (target_dates - dates[rows["info_idx"].to_numpy()]).days.to_numpy().astype(float)
    rows = rows.join(state, on="info_idx")
    rows["spot_ret_1d_vol"] = rows["spot_ret_1d"] / rows["prev_atm_iv"]
    rows["spot_ret_5d_vol"] = rows["spot_ret_5d"] / rows["prev_atm_iv"]
    own = rows["persistence"].notna() & rows["prev_loo_iv"].notna()
    surface = np.full(len(rows), np.nan)
    surface[~own.to_numpy()] = previous_surface(rows[~own], nodes, spot, sticky=fallback)
    rows["prev_surface_iv"] = rows["prev_loo_iv"].where(own, surface)
    rows["prev_iv_missing"] = rows["persistence"].isna().astype(float)
    rows["prev_iv"] = rows["persistence"].fillna(rows["prev_surface_iv"])
    rows["prev_iv_resid"] = rows["prev_iv"] - rows["prev_surface_iv"]
    rows["base"] = rows["prev_iv"]
    rows = rows.join(F.smile_features(rows, nodes))
    rows["sticky_moneyness_change"] = rows["prev_smile_iv"] - rows["prev_iv"]
    rows["moneyness_std"] = rows["log_moneyness"] / (rows["prev_iv"] * rows["sqrt_tau"])
    rows["spot_ret_gap_z"] = rows["spot_ret_1d"] / (rows["prev_atm_iv"] * np.sqrt(rows["gap_days"] / 365.0))
    rows["delta"] = bs_delta(rows["forward"], rows["strike"], rows["tau"], rows["prev_iv"], rows["rate"],
                             rows["dividend_yield"], rows["is_call"])
    no_base = ~np.isfinite(rows["base"])
    drops["drop_no_previous_surface"] = int(no_base.sum())
    rows = rows[~no_base].reset_index(drop=True)
    report = {"quotes": len(chain), "quote_dates": len(dates), "first_date": str(dates[0].date()),
              "last_date": str(dates[-1].date()), "dropped": drops,
              "rows_without_previous_quote": int(rows["prev_iv_missing"].sum())}
    rows.attrs["dates"] = dates
    return rows, report


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
    raise ValueError(f"unknown categorical feature {name!r}; valid names: {', '.join(F.CAT_FEATURES)}")


def prepare(chain: pd.DataFrame, *, features: list[str], target: str, horizon: int, val_fraction: float,
            test_fraction: float, source: str = "chain", cat_features: list[str] | None = None,
            n_folds: int = 1, fold: int = 0, fallback: str = "moneyness", train_dates: int | None = None,
            winsorize: float | None = None) -> Dataset:
    """Canonical chain (IV filled) -> ``Dataset``. No feature of a row uses data after its info date.

    ``winsorize``: clip the training targets (the change, or the level) to their ``winsorize`` and
    ``1 - winsorize`` quantiles on train; validation and test targets are never touched.
    """
    cat_features = list(cat_features or [])
    F.validate_names(features, cat_features)
    if target not in ("level", "change"):
        raise ValueError(f"data.target must be 'level' or 'change', got {target!r}")
    quotes: list[pd.DataFrame] = []
    rows, report = build_rows(chain, horizon=horizon, fallback=fallback, quotes=quotes)
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
                   "log_moneyness", "forward", "delta", "rate"]
    row_columns += [c for c in ("bid", "ask", "iv_bid", "iv_ask") if c in rows.columns]

    # Scaling and categorical vocabularies from the train part only.
    train = parts["train"]
    uncentered = np.array([f in F.UNCENTERED for f in features], dtype=bool)
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
                                f"quantiles [{clip[0] * 100:+.2f}, {clip[1] * 100:+.2f}] vol pts (train only)")
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
    base_rmse = lambda v: float(np.sqrt(np.mean((v["base"] - v["iv"]) ** 2)) * 100) if len(v) else float("nan")  # noqa: E731
    report["splits"] = {
        k: {"rows": len(v), "dates": f"{dates[v['target_idx'].min()].date()}..{dates[v['target_idx'].max()].date()}"
            if len(v) else "-", "n_dates": int(v["target_idx"].nunique()), "baseline_rmse": round(base_rmse(v), 4)}
        for k, v in parts.items()
    }
    report["features"] = list(features)
    return Dataset(**splits, feature_names=list(features), cat_cardinalities=[len(vocab[c]) + 1 for c in cat_features],
                   target=target, y_center=center, y_scale=scale, x_mean=x_mean, x_std=x_std, report=report,
                   cat_features=cat_features, cat_vocab=vocab, quotes=quotes[0].reset_index(drop=True),
                   horizon=horizon, last_chain=last_date_chain(chain))


def last_date_chain(chain: pd.DataFrame) -> pd.DataFrame:
    """The canonical chain rows of the last quote date (the surface the next date is re-marked from)."""
    return chain[chain["quote_date"] == chain["quote_date"].max()].reset_index(drop=True)


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
