"""Walk-forward evaluation (``evaluation=walk_forward``): one model per fold, scored on the concatenated
out-of-sample predictions.

Fold ``i`` of ``n`` is the data layer's own chronological fold (``data.n_folds=n data.fold=i``, see
``vforge.data.dataset.split_rows``): its test block is the ``i``-th of ``n`` consecutive blocks of
``data.test_fraction`` of the quote dates that end at the last date, its validation the ``data.val_fraction``
dates just before, with the embargo of ``data.horizon`` dates before each, and it trains on every date before its
validation (an expanding window) or on the last ``data.train_dates`` of them (a sliding window). No fold trains or
validates on a date at or after its test block (``tests/test_evaluation.py``).

Use it from code, e.g. to choose a shrinkage or a gate on many out-of-sample dates::

    from vforge.train import train
    result = walk_forward(cfg, train)        # cfg composed with evaluation=walk_forward
    result.predictions                       # every fold's test rows, one frame (column ``fold``)
    result.per_date                          # per-date RMSE of model, baseline, persistence, SSVI
    result.metrics["wf/dm_pvalue"], result.folds[0].metrics["test/rmse"]
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from vforge.evaluation.report import RunEvaluation, frame_metrics, log_files, summarize
from vforge.tracking.mlflow import ENV_PARENT_RUN, run_tags
from vforge.training.callbacks import run_status

log = logging.getLogger(__name__)

TrainFn = Callable[..., dict[str, float]]


@dataclass
class Fold:
    """One fold's run: its config, its metrics (``val/*``, ``test/*``) and its val/test predictions frames."""

    index: int
    cfg: DictConfig
    metrics: dict[str, float]
    val: pd.DataFrame
    test: pd.DataFrame
    train_dates: str = ""


@dataclass
class WalkForwardResult:
    """``metrics``: ``wf/*`` on the concatenated test predictions, ``wf/val_rmse`` (= ``val/rmse``) the mean of
    the folds' validation RMSE (what model selection uses); ``predictions``: all test rows with a ``fold`` column;
    ``per_date`` and ``fold_table`` as printed and written to the parent run."""

    folds: list[Fold]
    metrics: dict[str, float]
    predictions: pd.DataFrame
    per_date: pd.DataFrame
    fold_table: pd.DataFrame
    text: str
    val_predictions: pd.DataFrame | None = None  # every fold's validation rows (column ``fold``)
    evaluation: RunEvaluation | None = None
    seconds: float = 0.0


def fold_configs(cfg: DictConfig) -> list[DictConfig]:
    """The config of each fold's run: the data layer's fold ``i`` of ``evaluation.n_folds``, a holdout run
    (``evaluation.name=fold``, no plots: the parent plots the concatenated predictions) in ``<output_dir>/fold_<i>``."""
    n = int(cfg.evaluation.n_folds)
    if n < 2:
        raise ValueError(f"evaluation.n_folds must be >= 2 for walk-forward, got {n}; "
                         "for one split use evaluation=holdout")
    base = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    out = []
    for i in range(n):
        c = cast(DictConfig, copy.deepcopy(base))
        with open_dict(c):
            c.data.n_folds, c.data.fold = n, i
            c.evaluation = {"name": "fold", "plots": False}  # a holdout run, told it is one fold of several
            c.output_dir = str(Path(base.output_dir) / f"fold_{i}")
            c.run_name = f"{base.run_name}-fold{i}"
            c.optimized_metric = "val/rmse"  # each fold is scored on its own validation block
        out.append(c)
    return out


@contextlib.contextmanager
def _parent_run(run_id: str | None) -> Iterator[None]:
    """Runs started inside become children of ``run_id`` (restores the sweep's parent, if any, after)."""
    before = os.environ.get(ENV_PARENT_RUN)
    if run_id:
        os.environ[ENV_PARENT_RUN] = run_id
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV_PARENT_RUN, None)
        else:
            os.environ[ENV_PARENT_RUN] = before


def _read(fold_dir: Path, split: str) -> pd.DataFrame:
    path = fold_dir / "predictions" / f"{split}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"walk-forward: the fold run wrote no {path}; its train function must write the "
                                "predictions frames (vforge.evaluation.report.evaluate_run does)")
    return pd.read_parquet(path)


def _span(frame: pd.DataFrame) -> str:
    d = pd.DatetimeIndex(frame["target_date"])
    return f"{d.min().date()}..{d.max().date()} ({d.nunique()})" if len(d) else "-"


def walk_forward(cfg: DictConfig, train_fn: TrainFn, callbacks: Any = ()) -> WalkForwardResult:
    """Train one model per fold with ``train_fn(fold_cfg, callbacks=...)`` (``vforge.train.train``), each fold a child
    run of one MLflow parent run, then score the concatenated out-of-sample test predictions.

    The parent run logs ``wf/rmse``, ``wf/prev_quoted_rmse``, ``wf/persistence_rmse``, ``wf/baseline_rmse``,
    ``wf/dm_pvalue``, ``wf/dates_beaten`` (and the rest of ``frame_metrics``), ``wf/val_rmse``, the per-fold table,
    the per-date table, the predictions and the plots.
    """
    start = time.perf_counter()
    configs = fold_configs(cfg)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parent = instantiate(cfg.logger) if cfg.logger else None
    status = "FAILED"
    if parent:
        parent.start(cfg, run_name=f"{cfg.run_name}-walk_forward",
                     tags={**run_tags(cfg), "vforge.evaluation": "walk_forward"})
    try:
        folds = []
        with _parent_run(parent.run_id if parent else None):
            for c in configs:
                log.info("walk-forward fold %d/%d -> %s", c.data.fold + 1, len(configs), c.output_dir)
                metrics = train_fn(c, callbacks=callbacks)
                fold_dir = Path(c.output_dir)
                report = json.loads((fold_dir / "data_report.json").read_text())
                train = report["splits"]["train"]
                folds.append(Fold(int(c.data.fold), c, metrics, _read(fold_dir, "val"), _read(fold_dir, "test"),
                                  train_dates=f"{train['dates']} ({train.get('n_dates', '?')})"))
        result = score(folds, out_dir, horizon=int(cfg.data.horizon), plots=bool(cfg.evaluation.get("plots", True)))
        if parent:
            parent.log_metrics(result.metrics)
            if result.evaluation is not None:
                log_files(parent, result.evaluation)
        status = "FINISHED"
        result.seconds = time.perf_counter() - start
        return result
    except BaseException as e:
        status = run_status(e)
        raise
    finally:
        if parent:
            parent.end(status)


def score(folds: list[Fold], out_dir: str | Path, *, horizon: int = 0, plots: bool = True) -> WalkForwardResult:
    """The walk-forward metrics, tables and files of finished folds."""
    test = pd.concat([f.test.assign(fold=f.index) for f in folds], ignore_index=True)
    val = pd.concat([f.val.assign(fold=f.index) for f in folds], ignore_index=True)
    overlap = test.duplicated(["target_date", "expiry", "strike", "option_type"]).sum()
    assert not overlap, f"walk-forward test blocks overlap on {overlap} rows"
    metrics = frame_metrics("wf", test, horizon)
    metrics["wf/val_rmse"] = float(np.mean([f.metrics["val/rmse"] for f in folds]))
    metrics["val/rmse"] = metrics["wf/val_rmse"]  # what a sweep over walk-forward runs selects on
    metrics["wf/n_folds"] = float(len(folds))
    table = fold_table(folds)
    evaluation = summarize({"test": test}, metrics, out_dir, plots=plots, walk_forward=True,
                           prefixes={"test": "wf"}, title="walk-forward, all folds' test blocks (out of sample)")
    path = Path(out_dir) / "tables" / "folds.csv"
    table.to_csv(path, index=False, float_format="%.5g")
    evaluation.files["tables/folds.csv"] = path
    text = f"{format_fold_table(table)}\n{evaluation.text}"
    return WalkForwardResult(folds=folds, metrics=metrics, predictions=test, per_date=evaluation.per_date,
                             fold_table=table, text=text, val_predictions=val, evaluation=evaluation)


def fold_table(folds: list[Fold]) -> pd.DataFrame:
    rows = []
    for f in folds:
        m = lambda k, f=f: f.metrics.get(f"test/{k}", math.nan)  # noqa: E731
        rows.append({"fold": f.index, "train": f.train_dates, "val": _span(f.val), "test": _span(f.test),
                     "rows": len(f.test), "val_rmse": f.metrics.get("val/rmse", math.nan), "rmse": m("rmse"),
                     "baseline_rmse": m("baseline_rmse"), "prev_quoted_rmse": m("prev_quoted_rmse"),
                     "persistence_rmse": m("persistence_rmse"), "dm_pvalue": m("dm_pvalue"),
                     "dates_beaten": m("dates_beaten"), "best_epoch": f.metrics.get("best_epoch", math.nan)})
    return pd.DataFrame(rows)


def format_fold_table(table: pd.DataFrame) -> str:
    """The per-fold table as printed: dates (count), then test RMSE of the model, the baseline, and of the model
    and persistence on the previously quoted rows, DM p-value and dates won against persistence."""
    head = (f"{'fold':<5}{'train dates':<30}{'val dates':<30}{'test dates':<30}{'rows':>7}{'val':>7}{'model':>7}"
            f"{'basel.':>7}{'prev.q':>7}{'persis':>7}{'DM p':>7}{'won':>6}")
    lines = ["walk-forward folds (test RMSE in vol points; prev.q = the model on the rows quoted the previous date, "
             "persis = persistence on them)", head]
    for r in table.itertuples():
        won = f"{r.dates_beaten:>6.0%}" if r.dates_beaten == r.dates_beaten else f"{'-':>6}"
        lines.append(f"{r.fold:<5}{r.train:<30}{r.val:<30}{r.test:<30}{r.rows:>7}{r.val_rmse:>7.3f}{r.rmse:>7.3f}"
                     f"{r.baseline_rmse:>7.3f}{r.prev_quoted_rmse:>7.3f}{r.persistence_rmse:>7.3f}{r.dm_pvalue:>7.3f}{won}")
    return "\n".join(lines)
