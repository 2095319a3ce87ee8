"""The pictures of a run (matplotlib, non-interactive Agg backend), as PNGs under ``plots/``: learning curves, the
smiles of the last test date, an error heatmap by moneyness x tenor, per-date RMSE against persistence, residual
histograms, and the cumulative loss differential behind the DM test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vforge.data.iv import implied_vol
from vforge.data.target import VOL_POINTS
from vforge.evaluation.tables import MONEYNESS_LABELS, TENOR_LABELS, buckets

COLORS = {"market": "black", "model": "tab:blue", "baseline": "tab:gray", "persistence": "tab:orange",
          "ssvi": "tab:green"}
DPI = 90


def _figure(**kwargs: Any) -> Any:
    """A figure drawn by the Agg canvas: files only, never a window, no pyplot state (nor pyplot's import)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    # constrained/tight layout would draw every figure twice; fixed margins keep a run's plots cheap
    fig.savefig(path, dpi=DPI, pil_kwargs={"compress_level": 3})
    return path


def learning_curves(history: list[dict[str, float]], path: Path) -> Path | None:
    """Train loss and validation RMSE per epoch (the best epoch marked)."""
    if not history:
        return None
    h = pd.DataFrame(history)
    epoch = np.arange(len(h))
    fig = _figure(figsize=(9, 3.2))
    ax = fig.subplots(1, 2)
    if "train/loss" in h:
        ax[0].plot(epoch, h["train/loss"], marker=".")
    ax[0].set(title="train loss", xlabel="epoch")
    if "val/rmse_epoch" in h:
        ax[1].plot(epoch, h["val/rmse_epoch"], marker=".", color=COLORS["model"])
        ax[1].axvline(int(np.nanargmin(h["val/rmse_epoch"].to_numpy())), color="k", lw=0.8, ls=":")
    ax[1].set(title="validation RMSE (vol points)", xlabel="epoch")
    return _save(fig, path)


def _market_band(day: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """Bid and ask IVs of the rows: given, or inverted from bid/ask prices (NaN where they do not invert)."""
    if {"iv_bid", "iv_ask"} <= set(day.columns):
        return day["iv_bid"].to_numpy(np.float64), day["iv_ask"].to_numpy(np.float64)
    if not {"bid", "ask", "rate"} <= set(day.columns):
        return None
    forward, strike, tau, rate = (day[c].to_numpy(np.float64) for c in ("forward", "strike", "tau", "rate"))
    call = (day["option_type"] == "C").to_numpy()
    bid, _ = implied_vol(day["bid"].to_numpy(np.float64), forward, strike, tau, rate, call)
    ask, _ = implied_vol(day["ask"].to_numpy(np.float64), forward, strike, tau, rate, call)
    return bid, ask


def smiles(frame: pd.DataFrame, path: Path, *, horizon: int = 0, max_expiries: int = 4) -> Path | None:
    """The last date's smiles (out-of-the-money side), one panel per expiry: market (bid/ask bars where the chain
    has them and the row's quotes are of that date, ``horizon=0``), model, persistence, SSVI."""
    if frame.empty:
        return None
    day = frame[frame["target_date"] == frame["target_date"].max()]
    otm = np.where(day["option_type"] == "C", day["log_moneyness"] >= 0, day["log_moneyness"] < 0)
    day = day[otm] if otm.any() else day
    counts = day["expiry"].value_counts()
    expiries = np.sort(counts.index[counts >= 5].to_numpy() if (counts >= 5).any() else counts.index.to_numpy())
    if len(expiries) > max_expiries:
        expiries = expiries[np.unique(np.linspace(0, len(expiries) - 1, max_expiries).round().astype(int))]
    cols = min(2, len(expiries))
    rows = int(np.ceil(len(expiries) / cols))
    fig = _figure(figsize=(4.5 * cols, 2.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, expiry in zip(axes.ravel(), expiries):
        e = day[day["expiry"] == expiry].sort_values("log_moneyness")
        k = e["log_moneyness"].to_numpy()
        band = _market_band(e) if horizon == 0 else None
        if band is not None and np.isfinite(band[0]).any():
            mid = e["market"].to_numpy() * VOL_POINTS
            lo, hi = np.fmax(mid - band[0] * VOL_POINTS, 0), np.fmax(band[1] * VOL_POINTS - mid, 0)
            ax.errorbar(k, mid, yerr=[np.nan_to_num(lo), np.nan_to_num(hi)], fmt="o", ms=2.5, color=COLORS["market"],
                        ecolor="0.6", elinewidth=0.8, label="market (bid/ask)")
        else:
            ax.plot(k, e["market"] * VOL_POINTS, "o", ms=2.5, color=COLORS["market"], label="market")
        for p in ("model", "persistence", "ssvi"):
            if p in e.columns and np.isfinite(e[p]).any():
                ax.plot(k, e[p] * VOL_POINTS, "-" if p != "persistence" else "x", ms=3, lw=1.2, color=COLORS[p],
                        label=p)
        ax.set_title(f"{pd.Timestamp(expiry).date()} ({e['tau'].iloc[0] * 365:.0f} days)", fontsize=9)
        ax.set_xlabel("log-moneyness ln K/F", fontsize=8)
        ax.set_ylabel("IV (vol points)", fontsize=8)
    for ax in axes.ravel()[len(expiries):]:
        ax.set_visible(False)
    axes.ravel()[0].legend(fontsize=7)
    fig.suptitle(f"smiles on {pd.Timestamp(day['target_date'].iloc[0]).date()} (out-of-the-money quotes)", fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.1, top=0.9, hspace=0.45, wspace=0.28)
    return _save(fig, path)


def error_heatmap(frame: pd.DataFrame, path: Path) -> Path | None:
    """Model RMSE / baseline RMSE by moneyness x tenor (blue below 1: the model is better there), each cell
    annotated with the model's RMSE in vol points."""
    if frame.empty:
        return None
    b = buckets(frame)
    sq = pd.DataFrame({p: ((frame[p] - frame["market"]) * VOL_POINTS) ** 2 for p in ("model", "baseline")})
    cells = sq.groupby([b["tenor"], b["moneyness"]], observed=False).mean()
    grid = lambda s: s.unstack("moneyness").reindex(index=list(TENOR_LABELS), columns=list(MONEYNESS_LABELS))  # noqa: E731
    rmse, ratio = grid(np.sqrt(cells["model"])), grid(np.sqrt(cells["model"] / cells["baseline"]))
    fig = _figure(figsize=(7.5, 3.6))
    ax = fig.subplots()
    im = ax.imshow(ratio.to_numpy(np.float64), cmap="RdBu_r", vmin=0.5, vmax=1.5, aspect="auto")
    ax.set_xticks(range(len(ratio.columns)), ratio.columns, fontsize=8)
    ax.set_yticks(range(len(ratio.index)), ratio.index, fontsize=8)
    ax.set(title="model RMSE / baseline RMSE (text: model RMSE, vol points)", xlabel="moneyness k / sqrt(tau)",
           ylabel="tenor")
    for (i, j), v in np.ndenumerate(rmse.to_numpy(np.float64)):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax)
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.15, top=0.9)
    return _save(fig, path)


def per_date_rmse(per_date: pd.DataFrame, path: Path) -> Path | None:
    """Per-date RMSE of the model and persistence on the previously quoted rows, and of the baseline on all rows."""
    if per_date.empty:
        return None
    fig = _figure(figsize=(10, 3.4))
    ax = fig.subplots()
    for split, t in per_date.groupby("split", sort=False) if "split" in per_date else [("", per_date)]:
        d = pd.DatetimeIndex(t["target_date"])
        ax.plot(d, t["model_prev_quoted_rmse"], "-o", ms=2.5, color=COLORS["model"],
                label="model (prev. quoted)" if split in ("", "val") else None)
        ax.plot(d, t["persistence_rmse"], "-o", ms=2.5, color=COLORS["persistence"],
                label="persistence" if split in ("", "val") else None)
        ax.plot(d, t["baseline_rmse"], ":", lw=1, color=COLORS["baseline"],
                label="baseline (all rows)" if split in ("", "val") else None)
        if split:
            ax.axvspan(d.min(), d.max(), color="0.95" if split == "val" else "0.88", zorder=0)
            ax.text(d.min(), 0.98, f" {split}", va="top", fontsize=8, transform=ax.get_xaxis_transform())
    ax.set(ylabel="RMSE (vol points)", title="RMSE per quote date")
    ax.legend(fontsize=8)
    return _save(fig, path)


def residuals(frame: pd.DataFrame, path: Path) -> Path | None:
    """Histograms of the errors (vol points) of the model and persistence on the previously quoted rows."""
    prev = frame[frame["prev_quoted"]]
    if prev.empty:
        prev = frame
    fig = _figure(figsize=(6, 3.4))
    ax = fig.subplots()
    errs = {p: ((prev[p] - prev["market"]) * VOL_POINTS).dropna() for p in ("model", "persistence") if p in prev}
    errs = {p: e for p, e in errs.items() if len(e)}
    if not errs:
        return None
    lim = float(np.nanquantile(np.abs(np.concatenate([e.to_numpy() for e in errs.values()])), 0.995)) or 1.0
    bins = np.linspace(-lim, lim, 61)
    for p, e in errs.items():
        ax.hist(e.clip(-lim, lim), bins=bins, histtype="step", lw=1.4, color=COLORS[p],
                label=f"{p}  (sd {e.std():.2f})")
    ax.set(xlabel="prediction - market (vol points)", ylabel="rows", title="errors, previously quoted rows")
    ax.legend(fontsize=8)
    return _save(fig, path)


def loss_differential(per_date: pd.DataFrame, path: Path) -> Path | None:
    """Cumulative sum over dates of the model's minus persistence's mean squared error (what the DM test weighs):
    falling means the model is ahead."""
    if per_date.empty or not per_date["persistence_rmse"].notna().any():
        return None
    fig = _figure(figsize=(8, 3))
    ax = fig.subplots()
    d = (per_date["model_prev_quoted_rmse"] ** 2 - per_date["persistence_rmse"] ** 2).fillna(0.0)
    ax.plot(pd.DatetimeIndex(per_date["target_date"]), d.cumsum(), color=COLORS["model"])
    ax.axhline(0, color="k", lw=0.6)
    ax.set(ylabel="cumulative MSE difference (vol pts^2)",
           title="model minus persistence, previously quoted rows (down: model ahead)")
    return _save(fig, path)


def write_all(out_dir: Path, frames: dict[str, pd.DataFrame], per_date: pd.DataFrame, *,
              history: list[dict[str, float]] | None = None, horizon: int = 0) -> list[Path]:
    """Every plot into ``out_dir`` (created); returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    test = frames.get("test", next(iter(frames.values())))
    made = [
        learning_curves(history or [], out_dir / "learning_curves.png"),
        smiles(test, out_dir / "smiles_last_test_date.png", horizon=horizon),
        error_heatmap(test, out_dir / "error_heatmap.png"),
        per_date_rmse(per_date, out_dir / "per_date_rmse.png"),
        residuals(test, out_dir / "residuals.png"),
        loss_differential(per_date[per_date["split"] == "test"] if "split" in per_date else per_date,
                          out_dir / "loss_differential.png"),
    ]
    return [p for p in made if p is not None]
