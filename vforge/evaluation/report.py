"""Everything a run reports about its predictions: one predictions frame per split, the metrics derived from it
(beside persistence, the baseline and SSVI; DM test, dates won, arbitrage counts), per-date and per-bucket tables,
plots, warnings, and the files that hold them (in the run folder and in MLflow)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vforge.data.dataset import Dataset
from vforge.evaluation import arbitrage as arb
from vforge.evaluation import significance as sig
from vforge.evaluation.metrics import format_table, iv_errors, split_metrics
from vforge.evaluation.ssvi import ssvi_predictions
from vforge.evaluation.tables import bucket_table, format_buckets, per_date_table

log = logging.getLogger(__name__)

SPLITS = ("val", "test")
# Fewer validation or test dates than this: one volatility event can decide the comparison.
MIN_DATES = 20
PREDICTION_COLUMNS = ["split", "target_date", "info_date", "quote_date", "expiry", "strike", "option_type", "tau",
                      "log_moneyness", "forward", "delta", "prev_quoted", "market", "model", "baseline", "persistence"]


def predictions_frame(data: Dataset, split: str, model: np.ndarray, ssvi: np.ndarray | None = None) -> pd.DataFrame:
    """One row per scored contract of ``split``: identifying columns, terms, the market IV and every predictor's IV
    (decimal): ``model``, ``baseline``, ``persistence`` (NaN where the contract was not quoted the previous date),
    ``ssvi`` when given. Written to ``predictions/<split>.parquet``."""
    s = getattr(data, split)
    rows = s.rows
    frame = rows[[c for c in PREDICTION_COLUMNS if c in rows.columns]].copy()
    frame.insert(0, "split", split)
    frame["prev_quoted"] = np.isfinite(s.persistence)
    frame["market"] = s.iv
    frame["model"] = np.asarray(model, dtype=np.float64)
    frame["baseline"] = s.base
    frame["persistence"] = s.persistence
    if ssvi is not None:
        frame["ssvi"] = ssvi
    for c in ("bid", "ask", "iv_bid", "iv_ask", "rate"):
        if c in rows.columns:
            frame[c] = rows[c].to_numpy()
    return frame


def frame_metrics(prefix: str, frame: pd.DataFrame, horizon: int = 0) -> dict[str, float]:
    """Metrics of one predictions frame under ``prefix`` (``val``, ``test``, ``wf``).

    Beside ``split_metrics``' RMSE/MAE/R² of the model, baseline and persistence: ``dm_stat``/``dm_pvalue`` and
    ``dates_beaten`` against persistence on the previously quoted rows, ``baseline_dm_stat``/``baseline_dm_pvalue``
    and ``baseline_dates_beaten`` against the baseline on all rows (see ``significance``), ``n_dates``, and
    ``ssvi_rmse``/``ssvi_prev_quoted_rmse`` when the frame has SSVI.
    """
    cols = {c: frame[c].to_numpy(np.float64) for c in ("model", "market", "persistence", "baseline")}
    out = split_metrics(prefix, cols["model"], cols["market"], cols["persistence"], cols["baseline"])
    dates = frame["target_date"].to_numpy()
    prev = frame["prev_quoted"].to_numpy(bool)
    h = horizon + 1
    dm, won = sig.compare(dates, cols["model"], cols["persistence"], cols["market"], prev, horizon=h)
    out |= {f"{prefix}/dm_stat": dm.stat, f"{prefix}/dm_pvalue": dm.pvalue, f"{prefix}/dates_beaten": won}
    dm, won = sig.compare(dates, cols["model"], cols["baseline"], cols["market"], horizon=h)
    out |= {f"{prefix}/baseline_dm_stat": dm.stat, f"{prefix}/baseline_dm_pvalue": dm.pvalue,
            f"{prefix}/baseline_dates_beaten": won, f"{prefix}/n_dates": float(len(np.unique(dates)))}
    if "ssvi" in frame.columns:
        ssvi = frame["ssvi"].to_numpy(np.float64)
        ok = np.isfinite(ssvi)
        out[f"{prefix}/ssvi_rmse"] = iv_errors(ssvi[ok], cols["market"][ok])["rmse"]
        out[f"{prefix}/ssvi_prev_quoted_rmse"] = iv_errors(ssvi[ok & prev], cols["market"][ok & prev])["rmse"]
        out[f"{prefix}/ssvi_missing_rows"] = float((~ok).sum())  # info dates with < 5 quotes or a failed fit
    return out


def warnings_for(metrics: dict[str, float], frames: dict[str, pd.DataFrame], *, prefixes: dict[str, str] | None = None,
                 walk_forward: bool = False) -> list[str]:
    """What could mislead a reader of these numbers, in words: few dates, no persistence comparison, a model that
    looks better than persistence on validation without being significantly so."""
    out = []
    prefixes = prefixes or {s: s for s in frames}
    for split, frame in frames.items():
        p = prefixes[split]
        n_dates = frame["target_date"].nunique()
        if n_dates < MIN_DATES and not (walk_forward and p != "wf"):  # a fold's block is short by design
            hint = "" if walk_forward else "; evaluation=walk_forward scores many more out-of-sample dates"
            out.append(f"{split}: only {n_dates} quote date{'s' * (n_dates != 1)}; one volatility event can decide this comparison{hint}")
        if not frame["prev_quoted"].any():
            out.append(f"{split}: no contract was quoted on the previous quote date, so no persistence comparison "
                       "is possible (only the baseline, i.e. the previous surface)")
    v = lambda k: metrics.get(k, math.nan)  # noqa: E731
    if "val" in frames and v("val/prev_quoted_rmse") < v("val/persistence_rmse") and not v("val/dm_pvalue") < 0.05:
        out.append(f"val: the model's RMSE is below persistence's ({v('val/prev_quoted_rmse'):.3f} vs "
                   f"{v('val/persistence_rmse'):.3f}) but not significantly (DM p = {v('val/dm_pvalue'):.2f})")
    return out


@dataclass
class RunEvaluation:
    """What ``evaluate_run`` computed and wrote; ``text`` is what the run prints."""

    metrics: dict[str, float]
    frames: dict[str, pd.DataFrame]
    per_date: pd.DataFrame
    buckets: pd.DataFrame
    warnings: list[str]
    text: str
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


def evaluate_run(data: Dataset, predictions: dict[str, np.ndarray], out_dir: str | Path, evaluation: Any = None, *,
                 logger: Any = None, history: list[dict[str, float]] | None = None) -> RunEvaluation:
    """Score a trained model's val/test predictions (IV levels) every way a quant asks for, write the tables and
    predictions under ``out_dir`` (``predictions/``, ``tables/``, ``plots/``) and log them to ``logger``.

    Args:
        evaluation: the ``evaluation`` config (``plots``; ``name: fold`` for a walk-forward fold's run).

    Returns the metrics to add to the run's (``{split}/dm_pvalue``, ``{split}/dates_beaten``, ...).
    """
    plots = bool(evaluation.get("plots", True)) if evaluation is not None else True
    walk_forward = evaluation is not None and evaluation.get("name") == "fold"
    start = time.perf_counter()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "data_report.json").write_text(json.dumps(data.report, indent=1, default=str))
    ssvi: dict[str, np.ndarray | None] = {s: None for s in SPLITS}
    if data.quotes is not None:  # one vectorized fit of every info date both splits need
        rows = pd.concat([getattr(data, s).rows for s in SPLITS], ignore_index=True)
        both, _ = ssvi_predictions(data.quotes, rows)
        ssvi = dict(zip(SPLITS, np.split(both, [len(data.val)])))
    frames = {s: predictions_frame(data, s, predictions[s], ssvi[s]) for s in SPLITS}
    metrics: dict[str, float] = {}
    for s, frame in frames.items():
        metrics |= frame_metrics(s, frame, data.horizon)
    result = summarize(frames, metrics, out_dir, history=history, plots=plots, walk_forward=walk_forward,
                       horizon=data.horizon)
    if logger is not None:
        log_files(logger, result)
    result.seconds = time.perf_counter() - start
    return result


ARBITRAGE_SURFACES = ("model", "market", "persistence", "ssvi")


def arbitrage_metrics(prefix: str, frame: pd.DataFrame) -> tuple[dict[str, float], pd.DataFrame]:
    """``{prefix}/arb_calendar``, ``arb_butterfly``, ``cp_gap_vol_pts`` of the model's surfaces, and the same with
    ``market_``, ``persistence_`` (its previously quoted rows) and ``ssvi_`` in front; the per-date table."""
    metrics: dict[str, float] = {}
    tables = []
    for surface in ARBITRAGE_SURFACES:
        col = "market" if surface == "market" else surface
        if col not in frame.columns:
            continue
        table = arb.per_date(frame, col)
        name = "" if surface == "model" else f"{surface}_"
        metrics |= {f"{prefix}/{name}{k}": v for k, v in arb.summary(table).items()}
        tables.append(table.assign(surface=surface).reset_index())
    return metrics, pd.concat(tables, ignore_index=True)


def format_arbitrage(prefix: str, metrics: dict[str, float]) -> str:
    def row(key: str, fmt: str) -> str:
        vals = [(s, metrics.get(f"{prefix}/{'' if s == 'model' else s + '_'}{key}", math.nan)) for s in ARBITRAGE_SURFACES]
        return ", ".join(f"{s} {format(v, fmt)}" for s, v in vals if v == v) or "- (nothing to check)"

    return (f"arbitrage ({prefix}): calendar violations (share of checks) {row('arb_calendar', '.2%')}\n"
            f"  butterfly violations {row('arb_butterfly', '.2%')}\n"
            f"  call/put IV gap at one strike and expiry (vol points) {row('cp_gap_vol_pts', '.3f')}")


def summarize(frames: dict[str, pd.DataFrame], metrics: dict[str, float], out_dir: str | Path, *,
              history: list[dict[str, float]] | None = None, plots: bool = True, walk_forward: bool = False,
              prefixes: dict[str, str] | None = None, title: str = "results", horizon: int = 0) -> RunEvaluation:
    """Tables, printed text, warnings and files of already scored frames (a run's splits, or walk-forward's
    concatenated out-of-sample predictions). Adds the test frame's arbitrage counts to ``metrics``."""
    out = Path(out_dir)
    prefixes = prefixes or {s: s for s in frames}
    both = pd.concat(frames.values(), ignore_index=True)
    per_date = per_date_table(both)
    test = frames.get("test", both)
    bucket = bucket_table(test)
    test_prefix = prefixes.get("test", "test")
    arb_metrics, arb_table = arbitrage_metrics(test_prefix, test)
    metrics |= arb_metrics
    warnings = warnings_for(metrics, frames, prefixes=prefixes, walk_forward=walk_forward)
    files: dict[str, Path] = {}
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    for s, frame in frames.items():
        files[f"predictions/{s}.parquet"] = _write(frame.to_parquet, out / "predictions" / f"{s}.parquet", index=False)
    files["tables/per_date.csv"] = _write(per_date.to_csv, out / "tables" / "per_date.csv", index=False,
                                          float_format="%.5g")
    files["tables/buckets.csv"] = _write(bucket.to_csv, out / "tables" / "buckets.csv", index=False,
                                         float_format="%.5g")
    files["tables/arbitrage.csv"] = _write(arb_table.to_csv, out / "tables" / "arbitrage.csv", index=False,
                                           float_format="%.5g")
    if plots:
        from vforge.evaluation.plots import write_all  # matplotlib: only when plotting

        for path in write_all(out / "plots", frames, per_date, history=history, horizon=horizon):
            files[f"plots/{path.name}"] = path
    if warnings:
        (out / "warnings.txt").write_text("\n".join(warnings) + "\n")
        files["warnings.txt"] = out / "warnings.txt"
    rows = {prefixes[s]: (len(f), int(f["prev_quoted"].sum())) for s, f in frames.items()}
    text = f"{title}\n{format_table(metrics, rows)}\n{format_buckets(test)}\n{format_arbitrage(test_prefix, metrics)}"
    text += "".join(f"\nWARNING: {w}" for w in warnings)
    return RunEvaluation(metrics=metrics, frames=frames, per_date=per_date, buckets=bucket, warnings=warnings,
                         text=text, files=files)


def _write(fn: Callable[..., Any], path: Path, **kwargs: Any) -> Path:
    fn(path, **kwargs)
    return path


def log_files(logger: Any, result: RunEvaluation) -> None:
    """Every file of ``result`` into the run's artifacts, under its folder (``predictions/``, ``tables/``, ...)."""
    for name, path in result.files.items():
        folder = str(Path(name).parent)
        logger.log_artifact(path, None if folder == "." else folder)
