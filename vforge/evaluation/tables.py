"""Errors per quote date and per bucket (moneyness x tenor, calls/puts, new/previously quoted), from a predictions
frame (see ``vforge.evaluation.report.predictions_frame``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from vforge.data.target import VOL_POINTS

# Standardized moneyness k / sqrt(tau) (log-moneyness over root time, about a delta): wings to ATM.
MONEYNESS_EDGES = (-np.inf, -0.5, -0.15, -0.05, 0.05, 0.15, 0.5, np.inf)
MONEYNESS_LABELS = ("<-.5", "-.5:-.15", "-.15:-.05", "ATM", ".05:.15", ".15:.5", ">.5")
TENOR_EDGES_DAYS = (0, 14, 45, 120, 250, np.inf)
TENOR_LABELS = ("<2w", "2w-45d", "45d-4m", "4m-8m", ">8m")
PREDICTORS = ("model", "baseline", "persistence", "ssvi")


def _errors(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({p: frame[p] - frame["market"] for p in PREDICTORS if p in frame.columns})


def per_date_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per target date: rows, previously quoted rows, RMSE (vol points) of the model, baseline and SSVI on
    all rows, and of the model and persistence on the previously quoted rows, and whether the model beat
    persistence that day."""
    err = _errors(frame)
    prev = frame["prev_quoted"].to_numpy(bool)
    keys = [frame["split"], frame["target_date"]] if "split" in frame.columns else [frame["target_date"]]
    g = err.groupby(keys, sort=True)
    sq = (err * VOL_POINTS) ** 2
    out = pd.DataFrame({"rows": g.size()})
    out["prev_quoted_rows"] = pd.Series(prev, index=frame.index).groupby(keys).sum()
    for p in err.columns:
        if p != "persistence":
            out[f"{p}_rmse"] = np.sqrt(sq[p].groupby(keys).mean())
    sq_prev = sq[prev]
    prev_keys = [k[prev] for k in keys]
    out["model_prev_quoted_rmse"] = np.sqrt(sq_prev["model"].groupby(prev_keys).mean())
    out["persistence_rmse"] = np.sqrt(sq_prev["persistence"].groupby(prev_keys).mean())
    out["beats_persistence"] = out["model_prev_quoted_rmse"] < out["persistence_rmse"]
    return out.reset_index()


def buckets(frame: pd.DataFrame) -> pd.DataFrame:
    """The bucket labels of each row: ``moneyness`` (k / sqrt(tau)), ``tenor``, ``type`` (C/P), ``quoted`` (prev./new)."""
    z = frame["log_moneyness"] / np.sqrt(np.maximum(frame["tau"], 1e-6))
    return pd.DataFrame({
        "moneyness": pd.cut(z, MONEYNESS_EDGES, labels=MONEYNESS_LABELS),
        "tenor": pd.cut(frame["tau"] * 365.0, TENOR_EDGES_DAYS, labels=TENOR_LABELS, right=False),
        "type": frame["option_type"].astype(str),
        "quoted": np.where(frame["prev_quoted"], "prev. quoted", "new"),
    }, index=frame.index)


def bucket_table(frame: pd.DataFrame) -> pd.DataFrame:
    """RMSE (vol points) of every predictor per bucket: moneyness x tenor, then calls/puts, then new/prev. quoted.

    Columns ``group`` (``moneyness x tenor`` | ``type`` | ``quoted``), ``bucket``, ``rows``, ``<predictor>_rmse``
    (persistence on the previously quoted rows of the bucket only), ``model_vs_baseline`` (RMSE ratio).
    """
    sq, b = (_errors(frame) * VOL_POINTS) ** 2, buckets(frame)
    labels = {"moneyness x tenor": b["moneyness"].astype(str) + " x " + b["tenor"].astype(str),
              "type": b["type"], "quoted": b["quoted"]}
    parts = []
    for group, label in labels.items():
        g = sq.groupby(label.to_numpy(), sort=False)
        t = np.sqrt(g.mean()).add_suffix("_rmse")  # mean skips NaN: persistence on its own rows
        t.insert(0, "rows", g.size())
        t.insert(0, "group", group)
        parts.append(t.rename_axis("bucket").reset_index())
    out = pd.concat(parts, ignore_index=True)
    out["model_vs_baseline"] = out["model_rmse"] / out["baseline_rmse"]
    return out


def format_buckets(frame: pd.DataFrame) -> str:
    """A compact printed summary: model RMSE / baseline RMSE per moneyness x tenor cell (below 1: the model is
    better there), and the model against the baseline for calls/puts and new/previously quoted contracts."""
    sq, b = (_errors(frame) * VOL_POINTS) ** 2, buckets(frame)
    cells = sq.groupby([b["tenor"], b["moneyness"]], observed=True).mean()
    ratio = np.sqrt(cells["model"] / cells["baseline"]).unstack("moneyness")
    ratio = ratio.reindex(columns=[m for m in MONEYNESS_LABELS if m in ratio.columns])
    width = max(len(c) for c in ratio.columns) + 1 if len(ratio.columns) else 8
    lines = ["model RMSE / baseline RMSE by tenor (rows) x moneyness k/sqrt(tau) (columns); below 1: model better",
             f"{'':<8}" + "".join(f"{c:>{width}}" for c in ratio.columns)]
    for tenor, r in ratio.iterrows():
        lines.append(f"{tenor:<8}" + "".join(f"{v:>{width}.2f}" if np.isfinite(v) else f"{'-':>{width}}" for v in r))
    for key in ("type", "quoted"):
        rmse = np.sqrt(sq.groupby(b[key].to_numpy(), sort=True).mean())
        parts = [f"{name} {r['model']:.3f} vs {r['baseline']:.3f}" for name, r in rmse.iterrows()]
        lines.append(f"model vs baseline RMSE by {key}: " + ", ".join(parts))
    return "\n".join(lines)
