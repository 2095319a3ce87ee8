"""The AutoML leaderboard: trained checkpoints re-evaluated on one split beside persistence, the baseline, SSVI,
model=linear, LightGBM and an ensemble; RMSE/MAE/R² in vol points on all rows and on the previously quoted ones, the DM test
and dates won against persistence, arbitrage counts, training time, parameter count and inference latency."""

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
import torch
from hydra.utils import instantiate

from vforge.data.dataset import Dataset
from vforge.evaluation import arbitrage as arb
from vforge.evaluation.ensemble import fit_capped
from vforge.evaluation.metrics import METRICS, WORDS, iv_errors
from vforge.evaluation.report import frame_metrics, predictions_frame
from vforge.evaluation.ssvi import ssvi_predictions
from vforge.serving import ModelBundle, median_ms
from vforge.training.loop import predict_outputs

log = logging.getLogger(__name__)

COLUMNS = ["rank", "name", "kind", "val_rmse", "val_prev_quoted_rmse", "test_rmse", "test_prev_quoted_rmse",
           "test_dm_pvalue", "test_dates_beaten", "beats_persistence", "test_arb_calendar", "test_arb_butterfly",
           "test_mae", "test_r2", "train_s", "n_params", "latency_ms_1k", "latency_ms_row", "trials", "search_min",
           "notes"]
HEADER = ["#", "model", "kind", "val RMSE", "val RMSE prev. quoted", "test RMSE", "test RMSE prev. quoted",
          "DM p vs persistence", "dates won", "beats persistence", "calendar arb.", "butterfly arb.", "test MAE",
          "test R²", "train s", "params", "ms/1k rows", "ms/row", "trials", "search min", "notes"]
SIGNIFICANCE = 0.05


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
    evidence: np.ndarray | None = None  # the validation predictions a pick judges it on (None: val_pred)
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    # the predictor, for a servable ensemble (``save_ensemble``): a torch module with its config in ``info["config"]``,
    # a LightGBM booster, or None (the baseline: no change)
    model: Any = None

    def score(self, data: Dataset) -> Entry:
        """RMSE/MAE/R² on all rows (NaN for a predictor that does not cover them all, like persistence) and on the
        previously quoted rows; with a full ``Dataset``, the DM test, dates won and arbitrage counts on test."""
        for split in ("val", "test"):
            pred, s = getattr(self, f"{split}_pred"), getattr(data, split)
            scores = iv_errors(pred, s.iv) if np.isfinite(pred).all() else {m: math.nan for m in METRICS}
            persistence = getattr(s, "persistence", None)
            if persistence is not None:
                prev = np.isfinite(persistence) & np.isfinite(pred)
                scores |= {f"prev_quoted_{m}": v for m, v in iv_errors(pred[prev], s.iv[prev]).items()}
            setattr(self, split, scores)
        if isinstance(data, Dataset):
            frame = predictions_frame(data, "test", self.test_pred)
            m = frame_metrics("test", frame, data.horizon)
            table = arb.summary(arb.per_date(frame, "model"))
            self.test |= {"dm_pvalue": m["test/dm_pvalue"], "dates_beaten": m["test/dates_beaten"],
                          "persistence_rmse": m["test/persistence_rmse"], "arb_calendar": table["arb_calendar"],
                          "arb_butterfly": table["arb_butterfly"]}
        return self

    def beats_persistence(self) -> str:
        """yes: lower test RMSE than persistence on the previously quoted rows, DM p-value below 0.05."""
        p, mine, theirs = (self.test.get(k, math.nan) for k in ("dm_pvalue", "prev_quoted_rmse", "persistence_rmse"))
        if self.name == "persistence" or not (p == p):
            return "-"
        return "yes" if mine < theirs and p < SIGNIFICANCE else "no"

    def row(self, rank: int) -> dict[str, Any]:
        t = lambda k: self.test.get(k, math.nan)  # noqa: E731
        return {"rank": rank, "name": self.name, "kind": self.kind, "val_rmse": self.val["rmse"],
                "val_prev_quoted_rmse": self.val.get("prev_quoted_rmse", math.nan), "test_rmse": t("rmse"),
                "test_prev_quoted_rmse": t("prev_quoted_rmse"), "test_dm_pvalue": t("dm_pvalue"),
                "test_dates_beaten": t("dates_beaten"), "beats_persistence": self.beats_persistence(),
                "test_arb_calendar": t("arb_calendar"), "test_arb_butterfly": t("arb_butterfly"),
                "test_mae": t("mae"), "test_r2": t("r2"),
                "train_s": self.train_s, "n_params": self.n_params, "latency_ms_1k": self.latency_ms_1k,
                "latency_ms_row": self.latency_ms_row, "trials": self.info.get("trials", ""),
                "search_min": self.info.get("search_min", math.nan), "notes": self.info.get("notes", "")}


def latency_ms(fn: Callable[[], Any], x_rows: int, single: Callable[[], Any]) -> tuple[float, float]:
    """(median of 5 calls for a batch, ms per 1000 rows; median of 20 single-row calls, ms)."""
    return median_ms(fn, 5) * 1000.0 / max(x_rows, 1), median_ms(single, 20)


def module_latency(model: torch.nn.Module, test: Any, latency_rows: int) -> tuple[float, float]:
    """``latency_ms`` of a torch model on the first ``latency_rows`` test rows and on one row."""
    n = min(latency_rows, len(test))
    x_num, x_cat = test.x_num[:n], None if test.x_cat is None else test.x_cat[:n]
    x1, c1 = test.x_num[:1], None if test.x_cat is None else test.x_cat[:1]

    @torch.inference_mode()
    def run(x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return model(x, c)

    return latency_ms(lambda: run(x_num, x_cat), n, lambda: run(x1, c1))


def levels(model: torch.nn.Module, data: Dataset, output: int = 0) -> dict[str, np.ndarray]:
    """IV levels of ``model``'s output ``output`` on the val and test splits."""
    return {s: data.to_level(predict_outputs(model, getattr(data, s))[:, output], getattr(data, s))
            for s in ("val", "test")}


def load_data(ckpt: dict[str, Any]) -> Dataset:
    """The dataset a checkpoint was trained on, rebuilt from its resolved config (same seed, split, scaling)."""
    return instantiate(ckpt["config"]["data"], _convert_="all")


def model_entry(name: str, output_dir: str | Path, data: Dataset | None, latency_rows: int = 1000,
                info: dict[str, Any] | None = None) -> tuple[Entry, Dataset]:
    """Re-evaluate the checkpoint ``output_dir/model.pt`` of a finished run on its own data."""
    out = Path(output_dir)
    folds = sorted(out.glob("fold_*"), key=lambda p: int(p.name.split("_")[1]))
    if not (out / "model.pt").exists() and folds:  # a walk-forward run: its last fold is the plain split
        out = folds[-1]
    ckpt = torch.load(out / "model.pt", weights_only=False, map_location="cpu")
    if data is None:
        data = load_data(ckpt)
    if list(ckpt["feature_names"]) != list(data.feature_names):
        raise ValueError(f"{name}: trained on features {ckpt['feature_names']}, leaderboard data has "
                         f"{data.feature_names}; AutoML models must share one data config")
    model = ModelBundle.from_dict(ckpt).build_model()
    idx = int(ckpt.get("output_index", 0))
    preds = levels(model, data, idx)
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    lat = module_latency(model, data.test, latency_rows)
    entry = Entry(name, "model", preds["val"], preds["test"], train_s=float(metrics.get("train_seconds", math.nan)),
                  n_params=float(sum(p.numel() for p in model.parameters())), latency_ms_1k=lat[0],
                  latency_ms_row=lat[1], info=dict(info or {}, output_dir=str(out), config=ckpt["config"]), model=model)
    return entry.score(data), data


def persistence_entry(data: Dataset) -> Entry:
    """Persistence (``WORDS["persistence"]``): scored on the previously quoted rows only, no all-row score."""
    return Entry("persistence", "reference", data.val.persistence, data.test.persistence, train_s=0.0, n_params=0.0,
                 latency_ms_1k=0.0, latency_ms_row=0.0,
                 info={"notes": "the contract's previous IV; scored on the prev. quoted rows only"}).score(data)


def baseline_entry(data: Dataset) -> Entry:
    """The baseline (``WORDS["baseline"]``): persistence, else the previous surface, on every row."""
    return Entry("baseline", "reference", data.val.base, data.test.base, train_s=0.0, n_params=0.0,
                 latency_ms_1k=0.0, latency_ms_row=0.0,
                 info={"notes": "persistence, else the previous surface at the contract's moneyness"}).score(data)


def ssvi_entry(data: Dataset) -> Entry | None:
    """SSVI (``WORDS["ssvi"]``) at every row; None when the data carries no quotes to fit."""
    if data.quotes is None:
        return None
    import pandas as pd

    start = time.perf_counter()
    both, fit = ssvi_predictions(data.quotes, pd.concat([data.val.rows, data.test.rows], ignore_index=True))
    seconds = time.perf_counter() - start
    val, test = np.split(both, [len(data.val)])
    n_dates = int(np.isfinite(fit.rho).sum())
    return Entry("ssvi", "reference", val, test, train_s=seconds, n_params=float(np.isfinite(fit.theta).sum() + 3 * n_dates),
                 info={"notes": f"fit per previous date ({n_dates} dates, {seconds:.1f} s; n_params: all dates')"}).score(data)


def _lgb_features(split: Any) -> np.ndarray:
    x = split.x_num.numpy().astype(np.float64)
    return x if split.x_cat is None else np.concatenate([x, split.x_cat.numpy().astype(np.float64)], axis=1)


@dataclass
class LightGBMFit:
    """A fitted LightGBM reference: the booster (predict with ``num_iteration=booster.best_iteration``), its IV-level
    predictions of ``val`` and ``test`` and the seconds its fit took."""

    booster: Any
    pred: dict[str, np.ndarray]
    train_s: float


def lightgbm_fit(data: Dataset, *, seed: int = 0, n_threads: int = 2) -> LightGBMFit | None:
    """LightGBM on the same features and target (level or change), early-stopped on validation; None when
    lightgbm is not installed (``pip install vforge[lightgbm]``). The leaderboard's reference row and the results
    page's walk-forward LightGBM (``scripts/results_page.py``, one fit per fold) both fit it here."""
    try:
        import lightgbm as lgb
    except ImportError:
        log.warning("lightgbm is not installed: no LightGBM reference row (pip install lightgbm)")
        return None

    n_num = data.train.x_num.shape[1]
    cats = [] if data.train.x_cat is None else list(range(n_num, n_num + data.train.x_cat.shape[1]))
    params = {"objective": "regression", "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 20,
              "feature_fraction": 0.9, "bagging_fraction": 0.9, "bagging_freq": 1, "lambda_l2": 1.0,
              "seed": seed, "num_threads": n_threads, "verbosity": -1, "deterministic": True}
    train = lgb.Dataset(_lgb_features(data.train), data.train.y.numpy(), categorical_feature=cats or "auto")
    val = lgb.Dataset(_lgb_features(data.val), data.val.y.numpy(), reference=train)
    start = time.perf_counter()
    booster = lgb.train(params, train, num_boost_round=2000, valid_sets=[val],
                        callbacks=[lgb.early_stopping(100, verbose=False)])
    train_s = time.perf_counter() - start
    pred = {s: data.to_level(np.asarray(booster.predict(_lgb_features(getattr(data, s)),
                                                        num_iteration=booster.best_iteration)), getattr(data, s))
            for s in ("val", "test")}
    return LightGBMFit(booster, pred, train_s)


def lightgbm_entry(data: Dataset, *, seed: int = 0, n_threads: int = 2, latency_rows: int = 1000) -> Entry | None:
    """The LightGBM reference row (``lightgbm_fit``) with its latency; None when lightgbm is not installed."""
    fit = lightgbm_fit(data, seed=seed, n_threads=n_threads)
    if fit is None:
        return None
    booster, pred, train_s = fit.booster, fit.pred, fit.train_s
    x = _lgb_features(data.test)
    n = min(latency_rows, len(x))
    lat = latency_ms(lambda: booster.predict(x[:n], num_iteration=booster.best_iteration), n,
                     lambda: booster.predict(x[:1], num_iteration=booster.best_iteration))
    leaves = sum(t["num_leaves"] for t in booster.dump_model()["tree_info"][: booster.best_iteration])
    return Entry("lightgbm", "reference", pred["val"], pred["test"], train_s=train_s, n_params=float(leaves),
                 latency_ms_1k=lat[0], latency_ms_row=lat[1],
                 info={"notes": f"{booster.best_iteration} trees (n_params: leaves)"}, model=booster).score(data)


def linear_entry(data: Dataset, config: dict[str, Any], model_cfg: dict[str, Any],
                 latency_rows: int = 1000, save_to: str | Path | None = None) -> Entry:
    """``model=linear`` as the default command makes it, on the leaderboard's data: the ridge of ``model_cfg``
    (conf/model/linear.yaml) solved in closed form on train, then the run's do-no-harm step (``config["do_no_harm"]``
    of a searched model's run: how much of its predicted change to keep, chosen on inner walk-forward folds).
    ``save_to``: a folder where it is saved as a run is (``model.pt``), so that ``python -m vforge.predict`` serves it."""
    from vforge.training.gating import do_no_harm
    from vforge.training.loop import solve

    ridge = instantiate(model_cfg, n_num=data.n_num, cat_cardinalities=data.cat_cardinalities, d_out=1)
    ridge.prepare(data)
    start = time.perf_counter()
    result = solve(ridge, data)
    kept = do_no_harm(config.get("do_no_harm"), result.model, data,
                      {**config, "model": dict(model_cfg), "run_name": "linear"}, d_out=1)
    seconds = time.perf_counter() - start
    model = kept.module.eval()
    preds = levels(model, data)
    lat = module_latency(model, data.test, latency_rows)
    m = kept.metrics
    saved = {}
    if save_to is not None:
        from vforge.training.losses import as_loss

        Path(save_to).mkdir(parents=True, exist_ok=True)
        ModelBundle.of(model, data, as_loss(torch.nn.MSELoss()), kept.config).save(Path(save_to) / "model.pt")
        saved = {"output_dir": str(save_to)}
    shares = (f"; kept {m['do_no_harm/w_linear']:g} x its change on quoted rows, {m['do_no_harm/w_linear_new']:g} on "
              f"new contracts (do no harm)" if m else "")
    return Entry("linear", "reference", preds["val"], preds["test"], train_s=seconds,
                 n_params=float(sum(p.numel() for p in ridge.parameters())), latency_ms_1k=lat[0], latency_ms_row=lat[1],
                 info={"notes": "model=linear: closed-form ridge" + shares, "config": kept.config, **saved},
                 model=model).score(data)


def ensemble_entry(members: list[Entry], data: Dataset, cap: float | None = None) -> tuple[Entry, dict[str, float]]:
    """A convex combination of ``members`` with weights fit on validation predictions only, each date's rows weighted
    as ``capped_ratio`` weighs them when ``cap`` is given (``metrics.capped_row_weights``: a jump date counts no more
    than the ``cap`` quantile of the dates). The entry's ``evidence`` holds its cross-fitted validation predictions
    (``ensemble.cross_fit``: each block of dates with weights fit on the others), for a pick to judge it on."""
    va = data.val
    preds = np.stack([m.val_pred for m in members], axis=1)
    w, evidence = fit_capped(preds, va.iv, va.base, va.aux["quote_date_idx"].numpy(), cap)
    weights = {m.name: float(wi) for m, wi in zip(members, w)}
    test = np.stack([m.test_pred for m in members], axis=1) @ w
    used = [m for m, wi in zip(members, w) if wi > 0]
    entry = Entry(f"ensemble({'+'.join(m.name for m in members)})", "ensemble", preds @ w, test,
                  train_s=sum(m.train_s for m in used), n_params=sum(m.n_params for m in used),
                  latency_ms_1k=sum(m.latency_ms_1k for m in used), latency_ms_row=sum(m.latency_ms_row for m in used),
                  info={"notes": "weights on val" + (f" (dates capped at the {cap:g} quantile)" if cap is not None else "")
                        + ": " + ", ".join(f"{k} {v:.2f}" for k, v in weights.items())},
                  evidence=evidence)
    return entry.score(data), weights


def check_reproduces(model: torch.nn.Module, data: Dataset, expected: np.ndarray, what: str) -> None:
    """Raise unless ``model``'s test IV levels are ``expected`` (to 1e-5): a model built from its parts to be saved
    must predict what its parts' blend was scored on."""
    got = levels(model, data)["test"]
    if not np.allclose(got, expected, atol=1e-5):
        raise RuntimeError(f"the assembled model does not reproduce {what}: largest difference "
                           f"{np.abs(got - expected).max():.2e}")


def save_ensemble(members: list[Entry], weights: dict[str, float], data: Dataset, config: dict[str, Any],
                  out_dir: str | Path) -> Path:
    """The ensemble of ``members`` with ``weights`` (``ensemble_entry``'s) as one model (``vforge.models.ensemble``),
    saved as a run is (``out_dir/model.pt``, the config of the sweep's best run with this model) so that predict,
    the pyfunc and export serve it. Checked before it is saved: its test predictions are the ensemble row's."""
    from vforge.models.ensemble import assemble
    from vforge.training.losses import as_loss

    used = [m for m in members if weights[m.name] > 1e-9]  # a weight of 1e-16 is the optimizer's zero: no member
    nets = [(m.info["config"]["model"], m.model, weights[m.name]) for m in used if isinstance(m.model, torch.nn.Module)]
    trees = [m for m in used if m.model is not None and not isinstance(m.model, torch.nn.Module)]
    weight_zero = sum(weights[m.name] for m in used if m.model is None)
    if data.target != "change" and weight_zero > 0:
        raise ValueError("a weight on the baseline is a constant output only for a change target (data.target=change)")
    if len(trees) > 1:
        raise ValueError(f"an ensemble serves one LightGBM booster, got {[m.name for m in trees]}")
    ensemble, model_cfg = assemble(nets, trees[0].model if trees else None,
                                   sum(weights[m.name] for m in trees), weight_zero, -data.y_center / data.y_scale,
                                   n_num=data.n_num, cat_cardinalities=data.cat_cardinalities)
    check_reproduces(ensemble, data, np.stack([m.test_pred for m in members], axis=1)
                     @ np.array([weights[m.name] for m in members]), "the ensemble row (not saved)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ModelBundle.of(ensemble, data, as_loss(torch.nn.MSELoss()),
                   {**config, "model": model_cfg, "run_name": "ensemble"}).save(out / "model.pt")
    return out


def rank(entries: list[Entry], first: Entry | None = None) -> list[dict[str, Any]]:
    """Rows sorted by validation RMSE (what selection may use), persistence (no all-row score) last, ``first`` (the
    pick) ahead of all; test columns are for reading only."""
    key = lambda e: (e is not first, not e.val["rmse"] == e.val["rmse"], e.val["rmse"],  # noqa: E731
                     e.val.get("prev_quoted_rmse", 0))
    return [e.row(i + 1) for i, e in enumerate(sorted(entries, key=key))]


def _fmt(v: Any, col: str) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if col == "n_params":
            return f"{int(v):,}"
        if col in ("train_s", "search_min", "latency_ms_1k", "latency_ms_row"):
            return f"{v:.2f}" if v < 100 else f"{v:.0f}"
        if col in ("test_dates_beaten", "test_arb_calendar", "test_arb_butterfly"):
            return f"{v:.0%}" if col == "test_dates_beaten" else f"{v:.1%}"
        return f"{v:.3f}"
    return str(v)


def to_markdown(rows: list[dict[str, Any]], title: str = "") -> str:
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c], c) for c in COLUMNS) + " |")
    lines.append("")
    lines.append("RMSE/MAE in vol points (IV x 100); sorted by val RMSE; ensemble weights fit on val only. "
                 f"persistence: {WORDS['persistence']}; baseline: {WORDS['baseline']}; SSVI: {WORDS['ssvi']}. "
                 "DM p: one-sided Diebold-Mariano test against persistence on the test rows quoted the previous date; "
                 "dates won: share of test dates with a lower RMSE than persistence there; beats persistence: yes "
                 f"when lower and DM p < {SIGNIFICANCE}. Arbitrage: share of calendar / butterfly checks of the "
                 "predicted test surfaces that fail.")
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
