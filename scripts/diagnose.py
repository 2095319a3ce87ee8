"""Where a run loses to persistence: ``python scripts/accuracy.py diagnose <run folder> [<run folder> ...]``.

Reads a run's ``predictions/{val,test}.parquet`` (every run writes them) and prints, per split, on the previously
quoted rows: the RMSE ratio to persistence; the least-squares scale of the predicted change (``iv - persistence`` on
``model - persistence``: below 1 the model's changes are too large for this block, above 1 too timid) and the ratio at
that scale, i.e. what no shrinkage of this model can beat; how much of persistence's squared error the 10 worst dates
hold and the ratio without them (a few dates, or every date?); and the ratio and share of squared error per tenor
bucket and per calendar quarter (a period where a learnt drift went wrong shows as a quarter with a ratio near or
above 1 and a mean error far from 0).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from vforge.data.target import VOL_POINTS

TENORS = (0, 14, 45, 120, 240, np.inf)
TENOR_NAMES = ("<2w", "2w-45d", "45d-4m", "4m-8m", ">8m")


def diagnose(frame: pd.DataFrame, top: int = 10) -> dict:
    """The diagnosis of one split's predictions (the columns of ``predictions/<split>.parquet``), in vol points.

    Returns ``rows``, ``ratio``, ``scale`` (least-squares scale of the predicted change), ``ratio_at_scale``,
    ``corr`` (of predicted and true changes), ``top_share`` (persistence's squared error on its ``top`` worst dates
    over its total), ``ratio_without_top`` and the tables ``tenors`` and ``quarters`` (rows, ratio, share of
    persistence's squared error, mean model error)."""
    q = frame[frame["prev_quoted"]]
    true = (q["market"] - q["persistence"]).to_numpy() * VOL_POINTS
    pred = (q["model"] - q["persistence"]).to_numpy() * VOL_POINTS
    err, per = pred - true, -true
    total = float(np.sum(per**2))
    scale = float(pred @ true / (pred @ pred)) if pred.any() else 0.0
    by_date = pd.DataFrame({"m": err**2, "p": per**2, "d": q["target_date"].to_numpy()}).groupby("d").sum()
    worst = by_date.sort_values("p", ascending=False)
    rest = worst.iloc[top:]

    def table(keys: pd.Series, name: str) -> pd.DataFrame:
        g = pd.DataFrame({name: keys.array, "m": err**2, "p": per**2, "e": err}).groupby(name, observed=True)
        return pd.DataFrame({"rows": g.size(), "ratio": np.sqrt(g["m"].sum() / g["p"].sum()),
                             "share": g["p"].sum() / total, "mean_error": g["e"].mean()})

    tenor = pd.cut(q["tau"] * 365.0, TENORS, labels=TENOR_NAMES)
    return {"rows": len(q), "ratio": float(np.sqrt(np.sum(err**2) / total)), "scale": scale,
            "ratio_at_scale": float(np.sqrt(np.sum((scale * pred - true) ** 2) / total)),
            "corr": float(np.corrcoef(pred, true)[0, 1]) if len(q) > 1 and pred.std() > 0 else float("nan"),
            "top_share": float(worst["p"].iloc[:top].sum() / total),
            "ratio_without_top": float(np.sqrt(rest["m"].sum() / rest["p"].sum())) if len(rest) else float("nan"),
            "tenors": table(tenor, "tenor"),
            "quarters": table(q["target_date"].dt.to_period("Q").astype(str), "quarter")}


def format_diagnosis(split: str, d: dict, top: int = 10) -> str:
    head = (f"{split}: {d['rows']} previously quoted rows, model / persistence RMSE {d['ratio']:.3f}; best scale of the "
            f"predicted change {d['scale']:.3f} (ratio there {d['ratio_at_scale']:.3f}), corr {d['corr']:.3f}; the "
            f"{top} worst dates hold {d['top_share']:.0%} of persistence's squared error, ratio without them "
            f"{d['ratio_without_top']:.3f}")
    return "\n".join([head, d["tenors"].round(3).to_string(), d["quarters"].round(3).to_string()])


def main(args: argparse.Namespace) -> None:
    for run in args.runs:
        print(f"== {run}")
        for split in ("val", "test"):
            path = Path(run) / "predictions" / f"{split}.parquet"
            if path.exists():
                print(format_diagnosis(split, diagnose(pd.read_parquet(path))))


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("diagnose", help="where a run loses to persistence (its predictions/*.parquet)")
    d.add_argument("runs", nargs="+", help="run folders (outputs/runs/<time>_<model>)")
