"""The AutoML leaderboard: trained checkpoints re-evaluated on one split beside persistence, LightGBM and an
ensemble; test RMSE/MAE/R² in vol points, training time, parameter count and inference latency."""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate

from vforge.data.dataset import Dataset
from vforge.evaluation.ensemble import fit_weights
from vforge.evaluation.metrics import iv_errors
from vforge.training.loop import predict_outputs

log = logging.getLogger(__name__)

COLUMNS = ["rank", "name", "kind", "val_rmse", "test_rmse", "test_mae", "test_r2", "train_s", "n_params",
           "latency_ms_1k", "latency_ms_row", "trials", "search_min", "notes"]


@dataclass
class Entry:
    """One leaderboard row; ``val_pred``/``test_pred`` are IV levels (decimal) kept for the ensemble."""

    name: str
    kind: str  # model | reference | ensemble
    val_pred: np.ndarray
    test_pred: np.ndarray
    train_s: float = math.nan
    n_params: float = math.nan
    latency_ms_1k: float = math.nan
    latency_ms_row: float = math.nan
    info: dict[str, Any] = field(default_factory=dict)
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)

    def score(self, data: Dataset) -> Entry:
        self.val = iv_errors(self.val_pred, data.val.iv)
        self.test = iv_errors(self.test_pred, data.test.iv)
        return self

    def row(self, rank: int) -> dict[str, Any]:
        return {"rank": rank, "name": self.name, "kind": self.kind, "val_rmse": self.val["rmse"],
                "test_rmse": self.test["rmse"], "test_mae": self.test["mae"], "test_r2": self.test["r2"],
                "train_s": self.train_s, "n_params": self.n_params, "latency_ms_1k": self.latency_ms_1k,
                "latency_ms_row": self.latency_ms_row, "trials": self.info.get("trials", ""),
                "search_min": self.info.get("search_min", math.nan), "notes": self.info.get("notes", "")}


def latency_ms(fn, x_rows: int, single) -> tuple[float, float]:
    """(best of 5 for a batch, ms per 1000 rows; median of 20 single-row calls, ms)."""
    fn()  # warm-up: lazy init, allocator
    batch = min(_timed(fn) for _ in range(5)) * 1000.0 / max(x_rows, 1) * 1000.0
    single()
    row = statistics.median(_timed(single) for _ in range(20)) * 1000.0
    return batch, row


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def load_data(ckpt: dict[str, Any]) -> Dataset:
    """The dataset a checkpoint was trained on, rebuilt from its resolved config (same seed, split, scaling)."""
    return instantiate(ckpt["config"]["data"], _convert_="all")


def load_model(ckpt: dict[str, Any], data: Dataset) -> torch.nn.Module:
    """Rebuild the checkpoint's model; an averaged model's weights (``module.*``) load into the plain model."""
    model = instantiate(ckpt["config"]["model"], n_num=len(ckpt["feature_names"]),
                        cat_cardinalities=data.cat_cardinalities, d_out=int(ckpt.get("d_out", 1)))
    state = ckpt["state_dict"]
    if any(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}
    model.load_state_dict(state)
    return model.eval()


def model_entry(name: str, output_dir: str | Path, data: Dataset | None, latency_rows: int = 1000,
                info: dict[str, Any] | None = None) -> tuple[Entry, Dataset]:
    """Re-evaluate the checkpoint ``output_dir/model.pt`` of a finished run on its own data."""
    out = Path(output_dir)
    ckpt = torch.load(out / "model.pt", weights_only=False, map_location="cpu")
    if data is None:
        data = load_data(ckpt)
    if list(ckpt["feature_names"]) != list(data.feature_names):
        raise ValueError(f"{name}: trained on features {ckpt['feature_names']}, leaderboard data has "
                         f"{data.feature_names}; AutoML models must share one data config")
    model = load_model(ckpt, data)
    idx = int(ckpt.get("output_index", 0))
    preds = {s: data.to_level(predict_outputs(model, getattr(data, s))[:, idx], getattr(data, s))
             for s in ("val", "test")}
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    test = data.test
    n = min(latency_rows, len(test))
    x_num, x_cat = test.x_num[:n], None if test.x_cat is None else test.x_cat[:n]
    x1, c1 = test.x_num[:1], None if test.x_cat is None else test.x_cat[:1]

    @torch.inference_mode()
    def run(x, c):
        return model(x, c)

    lat = latency_ms(lambda: run(x_num, x_cat), n, lambda: run(x1, c1))
    entry = Entry(name, "model", preds["val"], preds["test"], train_s=float(metrics.get("train_seconds", math.nan)),
                  n_params=float(sum(p.numel() for p in model.parameters())), latency_ms_1k=lat[0],
                  latency_ms_row=lat[1], info=dict(info or {}, output_dir=str(out)))
    return entry.score(data), data


def persistence_entry(data: Dataset) -> Entry:
    """Yesterday's IV of the contract (the previous surface where the contract is new): the bar to beat."""
    return Entry("persistence", "reference", data.val.base, data.test.base, train_s=0.0, n_params=0.0,
                 latency_ms_1k=0.0, latency_ms_row=0.0,
                 info={"notes": "previous IV of the contract, else of the nearest quote"}).score(data)


def lightgbm_entry(data: Dataset, *, seed: int = 0, n_threads: int = 2, latency_rows: int = 1000) -> Entry | None:
    """LightGBM on the same features and target (level or change), early-stopped on validation; None when
    lightgbm is not installed (``pip install vforge[lightgbm]``)."""
    try:
        import lightgbm as lgb
    except ImportError:
        log.warning("lightgbm is not installed: no LightGBM reference row (pip install lightgbm)")
        return None

    def features(split):
        x = split.x_num.numpy().astype(np.float64)
        return x if split.x_cat is None else np.concatenate([x, split.x_cat.numpy().astype(np.float64)], axis=1)

    n_num = data.train.x_num.shape[1]
    cats = [] if data.train.x_cat is None else list(range(n_num, n_num + data.train.x_cat.shape[1]))
    params = {"objective": "regression", "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 20,
              "feature_fraction": 0.9, "bagging_fraction": 0.9, "bagging_freq": 1, "lambda_l2": 1.0,
              "seed": seed, "num_threads": n_threads, "verbosity": -1, "deterministic": True}
    train = lgb.Dataset(features(data.train), data.train.y.numpy(), categorical_feature=cats or "auto")
    val = lgb.Dataset(features(data.val), data.val.y.numpy(), reference=train)
    start = time.perf_counter()
    booster = lgb.train(params, train, num_boost_round=2000, valid_sets=[val],
                        callbacks=[lgb.early_stopping(100, verbose=False)])
    train_s = time.perf_counter() - start
    pred = {s: data.to_level(booster.predict(features(getattr(data, s)), num_iteration=booster.best_iteration),
                             getattr(data, s)) for s in ("val", "test")}
    x = features(data.test)
    n = min(latency_rows, len(x))
    lat = latency_ms(lambda: booster.predict(x[:n], num_iteration=booster.best_iteration), n,
                     lambda: booster.predict(x[:1], num_iteration=booster.best_iteration))
    leaves = sum(t["num_leaves"] for t in booster.dump_model()["tree_info"][: booster.best_iteration])
    return Entry("lightgbm", "reference", pred["val"], pred["test"], train_s=train_s, n_params=float(leaves),
                 latency_ms_1k=lat[0], latency_ms_row=lat[1],
                 info={"notes": f"{booster.best_iteration} trees (n_params: leaves)"}).score(data)


def ensemble_entry(members: list[Entry], data: Dataset) -> tuple[Entry, dict[str, float]]:
    """A convex combination of ``members`` with weights fit on validation predictions only."""
    w = fit_weights(np.stack([m.val_pred for m in members], axis=1), data.val.iv)
    weights = {m.name: float(wi) for m, wi in zip(members, w)}
    val = np.stack([m.val_pred for m in members], axis=1) @ w
    test = np.stack([m.test_pred for m in members], axis=1) @ w
    used = [m for m, wi in zip(members, w) if wi > 0]
    entry = Entry(f"ensemble({'+'.join(m.name for m in members)})", "ensemble", val, test,
                  train_s=sum(m.train_s for m in used), n_params=sum(m.n_params for m in used),
                  latency_ms_1k=sum(m.latency_ms_1k for m in used), latency_ms_row=sum(m.latency_ms_row for m in used),
                  info={"notes": "weights on val: " + ", ".join(f"{k} {v:.2f}" for k, v in weights.items())})
    return entry.score(data), weights


def rank(entries: list[Entry]) -> list[dict[str, Any]]:
    """Rows sorted by validation RMSE (what selection may use); test columns are for reading only."""
    return [e.row(i + 1) for i, e in enumerate(sorted(entries, key=lambda e: e.val["rmse"]))]


def _fmt(v: Any, col: str) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if col == "n_params":
            return f"{int(v):,}"
        if col in ("train_s", "search_min", "latency_ms_1k", "latency_ms_row"):
            return f"{v:.2f}" if v < 100 else f"{v:.0f}"
        return f"{v:.3f}"
    return str(v)


def to_markdown(rows: list[dict[str, Any]], title: str = "") -> str:
    head = ["#", "model", "kind", "val RMSE", "test RMSE", "test MAE", "test R²", "train s", "params",
            "ms/1k rows", "ms/row", "trials", "search min", "notes"]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c], c) for c in COLUMNS) + " |")
    lines.append("")
    lines.append("RMSE/MAE in vol points (IV x 100); sorted by val RMSE; ensemble weights fit on val only.")
    return "\n".join(lines)


def write(rows: list[dict[str, Any]], out_dir: str | Path, title: str = "") -> tuple[Path, Path]:
    """leaderboard.md and leaderboard.csv in ``out_dir``."""
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, csv = out / "leaderboard.md", out / "leaderboard.csv"
    md.write_text(to_markdown(rows, title) + "\n")
    pd.DataFrame(rows, columns=COLUMNS).to_csv(csv, index=False)
    return md, csv
