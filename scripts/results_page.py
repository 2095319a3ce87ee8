"""The README's results page (issue 10): walk-forward rows of every predictor on several data options, from one
command::

    python scripts/accuracy.py results --data synthetic synthetic_messy china50etf \\
        --models linear lightgbm mlp resnet ft_transformer [--epochs N --patience P] [-- extra overrides]

A *cell* is one (data, predictor) walk-forward (``evaluation=walk_forward evaluation.n_folds=4``, one thread):

- a vforge model (``linear``, ``mlp``, ``resnet``, ``ft_transformer``, ...): ``vforge.evaluation.walk_forward``
  over ``vforge.train.train``, exactly what ``python -m vforge.train data=<d> model=<m> evaluation=walk_forward``
  runs, do no harm included;
- ``lightgbm``: the same folds, each fold's data built by the same config, fit by the AutoML leaderboard's
  ``lightgbm_fit`` (its settings, early-stopped on the fold's validation block, not gated) and scored by the same
  ``evaluate_run``;
- ``ensemble``: per fold, AutoML's ensemble as the leaderboard builds it, without its search: the
  ``ENSEMBLE_SIZE`` cells of searched models (every vforge-model cell but ``linear``) with the lowest validation
  RMSE on that fold, the ``linear`` and ``lightgbm`` cells and the baseline; convex weights fit on that fold's
  validation block with each date's weight capped as do no harm caps it (``capped_row_weights``), applied to its
  test block;
- ``automl``: per fold, AutoML's pick (``vforge.evaluation.selection.pick``, as ``vforge.sweeps.automl`` calls it)
  among the ``linear`` cell (the fallback), the network cells by their number of parameters and the ensemble
  (judged on its cross-fitted validation predictions), with the fold's do-no-harm tolerance, p-value bar and cap.
  LightGBM is a member of the ensemble and no candidate alone, as on the leaderboard. Each fold's ``pick.json``
  says what was picked and why.

Persistence, the baseline and SSVI come with every cell's predictions (the same rows in every cell: checked).

Resumable: each finished fold leaves ``<out>/<data>/<cell>/fold_<i>/metrics.json`` and a rerun reuses it; each
finished cell leaves ``<out>/<data>/<cell>/cell.json`` (pooled scores, what do no harm kept per fold, the commit,
the machine's load) and a rerun only computes missing cells. The page (``<out>/results.md``, printed) is built from
the ``cell.json`` files alone: ``--table`` rebuilds it without computing anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from vforge.evaluation import leaderboard as L
from vforge.evaluation import selection
from vforge.evaluation import significance as sig
from vforge.evaluation.ensemble import fit_capped
from vforge.evaluation.report import evaluate_run, frame_metrics
from vforge.evaluation.walk_forward import walk_forward

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
REFERENCES = ("persistence", "baseline", "ssvi")
MODELS = ("linear", "lightgbm", "mlp", "resnet", "ft_transformer")
LIGHTGBM, ENSEMBLE, AUTOML = "lightgbm", "ensemble", "automl"
ENSEMBLE_SIZE = 3  # conf/experiment/automl.yaml: hydra.sweeper.ensemble_size
REFERENCE_CELLS = ("linear", LIGHTGBM)  # ensemble members always, never among the searched models
N_FOLDS = 4
KEY = ["target_date", "expiry", "strike", "option_type"]
# The page's own settings per data option: none, every cell is the model's default config (on an idle 2-core
# machine the china50etf cells take minutes each; --epochs/--patience shorten them for every data option).
PAGE_OVERRIDES: dict[str, list[str]] = {}
LABELS = {"persistence": "persistence", "baseline": "baseline", "ssvi": "SSVI", "linear": "linear",
          "lightgbm": "LightGBM", "mlp": "mlp", "resnet": "resnet", "ft_transformer": "ft_transformer",
          "ensemble": "ensemble", "automl": "AutoML pick"}

FoldFn = Callable[..., dict[str, float]]


# ---- one cell ---------------------------------------------------------------------------------------------------

def cell_overrides(data: str, model: str, n_folds: int, extra: Sequence[str]) -> list[str]:
    """The overrides of a cell's walk-forward (``lightgbm`` and ``ensemble`` compose ``model=linear``, unused)."""
    vforge_model = model if model not in (LIGHTGBM, ENSEMBLE, AUTOML) else "linear"
    return ["logger=none", f"data={data}", f"model={vforge_model}", "evaluation=walk_forward",
            f"evaluation.n_folds={n_folds}", "evaluation.plots=false", "trainer.num_threads=1",
            *PAGE_OVERRIDES.get(data, []), *extra]


def compose_cell(overrides: list[str], out: Path, name: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir, cfg.run_name = str(out), name
    return cfg


def reusing(fold_fn: FoldFn) -> FoldFn:
    """``fold_fn`` for the folds that have not finished; a finished fold (its ``metrics.json``, written last, and
    its predictions) is read back instead of run again."""

    def run(cfg: DictConfig, callbacks: Any = ()) -> dict[str, float]:
        fold_dir = Path(cfg.output_dir)
        done = fold_dir / "metrics.json"
        if done.exists() and all((fold_dir / "predictions" / f"{s}.parquet").exists() for s in ("val", "test")):
            log.info("reusing the finished fold %s", fold_dir)
            return json.loads(done.read_text())
        return fold_fn(cfg, callbacks=callbacks)

    return run


def lightgbm_fold(cfg: DictConfig, callbacks: Any = ()) -> dict[str, float]:
    """One walk-forward fold of LightGBM: the fold's data, the leaderboard's fit, the runs' own evaluation."""
    data = instantiate(cfg.data, _convert_="all")
    fit = L.lightgbm_fit(data, n_threads=1)
    if fit is None:
        raise RuntimeError("lightgbm is not installed: pip install lightgbm, or leave lightgbm out of --models")
    report = evaluate_run(data, fit.pred, cfg.output_dir, cfg.evaluation)
    metrics = report.metrics | {"train_seconds": fit.train_s, "lightgbm/trees": float(fit.booster.best_iteration)}
    (Path(cfg.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def fold_frames(dirs: dict[str, Path], names: Sequence[str], fold: int) -> dict[str, dict[str, pd.DataFrame]]:
    """The validation and test predictions of the cells ``names`` on one fold (``split -> name -> frame``), checked
    to hold the same rows, plus ``baseline``: the first frame with the baseline as its ``model``."""
    frames = {s: {n: pd.read_parquet(dirs[n] / "predictions" / f"{s}.parquet") for n in names}
              for s in ("val", "test")}
    for split, by_name in frames.items():
        first = by_name[names[0]]
        for name, f in by_name.items():
            if not (f[KEY].equals(first[KEY]) and np.array_equal(f["market"], first["market"])):
                raise ValueError(f"fold {fold}: {name}'s {split} rows differ from {names[0]}'s; "
                                 "the cells ran on different data (rerun them on one commit)")
        by_name["baseline"] = first.assign(model=first["baseline"])
    return frames


@dataclass
class Blend:
    """An ensemble on one fold: its members' convex ``weights`` fit on the validation block (dates capped), its
    validation predictions in sample (``val``) and cross-fitted (``evidence``), its test predictions (``test``)."""

    weights: np.ndarray
    val: np.ndarray
    evidence: np.ndarray
    test: np.ndarray


def blend(frames: dict[str, dict[str, pd.DataFrame]], members: list[str], cap: float) -> Blend:
    """AutoML's ensemble of ``members`` on one fold's frames, fit as ``leaderboard.ensemble_entry`` fits it
    (``ensemble.fit_capped``)."""
    va = frames["val"][members[0]]
    preds = {s: np.stack([frames[s][n]["model"].to_numpy(np.float64) for n in members], axis=1) for s in frames}
    w, evidence = fit_capped(preds["val"], va["market"].to_numpy(np.float64), va["baseline"].to_numpy(np.float64),
                             va["target_date"].to_numpy(), cap)
    return Blend(w, preds["val"] @ w, evidence, preds["test"] @ w)


def ensemble_members(dirs: dict[str, Path], fold: int, size: int) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The ensemble's members on one fold, as the leaderboard takes them: the ``size`` searched models (every cell
    but ``linear`` and ``lightgbm``) with the lowest validation RMSE on the fold, then ``linear``, ``lightgbm`` and
    the baseline; and each cell's fold metrics."""
    metrics = {n: json.loads((d / f"fold_{fold}" / "metrics.json").read_text()) for n, d in dirs.items()}
    searched = sorted((n for n in dirs if n not in REFERENCE_CELLS), key=lambda n: metrics[n]["val/rmse"])
    return [*searched[:size], *(n for n in REFERENCE_CELLS if n in dirs), "baseline"], metrics


def write_fold(out: Path, frames: dict[str, pd.DataFrame], source: Path, horizon: int,
               extra: dict[str, float]) -> dict[str, float]:
    """A computed fold's predictions (``frames``: split -> frame), data report (``source``'s) and metrics."""
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    for split, frame in frames.items():
        frame.to_parquet(out / "predictions" / f"{split}.parquet", index=False)
        metrics |= frame_metrics(split, frame, horizon)
    shutil.copy(source / "data_report.json", out / "data_report.json")
    metrics |= extra
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def ensemble_fold(members: dict[str, Path], size: int = ENSEMBLE_SIZE) -> FoldFn:
    """One walk-forward fold of AutoML's ensemble of the cells ``members`` (``ensemble_members``: the best ``size``
    searched models on this fold's validation RMSE, the linear model and the baseline), its weights fit on the
    fold's validation block with the dates capped as do no harm caps them."""

    def run(cfg: DictConfig, callbacks: Any = ()) -> dict[str, float]:
        i, out = int(cfg.data.fold), Path(cfg.output_dir)
        dirs = {name: d / f"fold_{i}" for name, d in members.items()}
        names, _ = ensemble_members(members, i, size)
        frames = fold_frames(dirs, [n for n in names if n != "baseline"], i)
        b = blend(frames, names, float(cfg.do_no_harm.cap))
        pred = {"val": b.val, "test": b.test}
        return write_fold(out, {s: frames[s][names[0]].assign(model=pred[s]) for s in pred}, dirs[names[0]],
                          int(cfg.data.horizon), {f"ensemble/w_{n}": float(w) for n, w in zip(names, b.weights)})

    return run


def automl_fold(members: dict[str, Path], size: int = ENSEMBLE_SIZE) -> FoldFn:
    """One walk-forward fold of AutoML's pick among the cells ``members`` (``selection.pick``, as the AutoML
    sweeper calls it): ``linear`` first (the fallback), then the other cells by their number of parameters, then
    the ensemble judged on its cross-fitted validation predictions; the do-no-harm settings of the fold's config.
    The pick and why go to the fold's ``pick.json``."""

    def run(cfg: DictConfig, callbacks: Any = ()) -> dict[str, float]:
        i, out = int(cfg.data.fold), Path(cfg.output_dir)
        dirs = {name: d / f"fold_{i}" for name, d in members.items()}
        names, metrics = ensemble_members(members, i, size)
        # LightGBM: a member, no candidate alone
        models = [n for n in dirs if n not in REFERENCE_CELLS]

        def simpler(n: str) -> tuple[float, float]:
            return metrics[n].get("n_params", math.inf), metrics[n]["val/rmse"]

        candidates = selection.candidates("linear" if "linear" in dirs else min(models, key=simpler), models,
                                          simpler, ENSEMBLE)
        order = candidates[:-1]
        frames = fold_frames(dirs, [*order, *(n for n in dirs if n not in order)], i)
        settings = cfg.do_no_harm
        b = blend(frames, names, float(settings.cap))
        va = frames["val"][order[0]]
        val = [*(frames["val"][n]["model"].to_numpy(np.float64) for n in order), b.evidence]
        chosen = selection.pick(candidates, val, va["market"].to_numpy(np.float64),
                                va["baseline"].to_numpy(np.float64), va["target_date"].to_numpy(),
                                va["persistence"].notna().to_numpy(), tolerance=float(settings.tolerance),
                                max_p=float(settings.max_p), cap=float(settings.cap))
        name = chosen.name
        pred = ({"val": b.val, "test": b.test} if name == ENSEMBLE else
                {s: frames[s][name]["model"].to_numpy() for s in ("val", "test")})
        out.mkdir(parents=True, exist_ok=True)
        (out / "pick.json").write_text(json.dumps({"pick": name, "why": chosen.why, "scores": chosen.scores,
                                                   "ensemble": dict(zip(names, b.weights.tolist()))}, indent=1))
        return write_fold(out, {s: frames[s][order[0]].assign(model=pred[s]) for s in pred}, dirs[order[0]],
                          int(cfg.data.horizon), {"automl/pick_index": float(chosen.index)})

    return run


def scores(frame: pd.DataFrame, column: str, horizon: int = 0) -> dict[str, float]:
    """Pooled scores of one predictor column of a walk-forward predictions frame, by ``frame_metrics`` (so a
    model's equal the printed ``wf/*``): RMSE (vol points) on the previously quoted rows and persistence's on them,
    on all rows and the baseline's, DM p and dates won against persistence (quoted rows) and the baseline (all
    rows). Rows where ``column`` is missing (SSVI's failed dates) are left out of both sides and counted."""
    ok = frame[column].notna().to_numpy() | (column == "persistence")
    f = frame[ok]
    m = frame_metrics("wf", f.assign(model=f[column]), horizon)
    keys = {"prev_rmse": "prev_quoted_rmse", "persistence_rmse": "persistence_rmse", "all_rmse": "rmse",
            "baseline_rmse": "baseline_rmse", "dm_p": "dm_pvalue", "won": "dates_beaten",
            "baseline_dm_p": "baseline_dm_pvalue", "baseline_won": "baseline_dates_beaten", "n_dates": "n_dates"}
    out = {k: float(m[f"wf/{v}"]) for k, v in keys.items()}
    return out | {"rows": float(len(f)), "prev_rows": float(f["prev_quoted"].sum()), "missing_rows": float((~ok).sum())}


def commit() -> str:
    """The checkout's short commit, ``+dirty`` when tracked files differ from it."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "-uno") else "")


def run_cell(data: str, name: str, out: Path, extra: Sequence[str], *, n_folds: int = N_FOLDS,
             members: dict[str, Path] | None = None, fold_fn: FoldFn | None = None) -> dict[str, Any]:
    """Compute one cell (its unfinished folds) and write its ``cell.json``; returns what it wrote.

    ``fold_fn`` defaults to ``vforge.train.train`` for a vforge model, ``lightgbm_fold``, ``ensemble_fold(members)``
    or ``automl_fold(members)``.
    """
    cell = out / data / name
    overrides = cell_overrides(data, name, n_folds, extra)
    settings = cell / "overrides.json"
    if settings.exists() and json.loads(settings.read_text()) != overrides:
        raise ValueError(f"{cell} holds folds run with other overrides ({json.loads(settings.read_text())}, now "
                         f"{overrides}); use another --out or --rerun {name}")
    cell.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(overrides))
    if fold_fn is None:
        if name == LIGHTGBM:
            fold_fn = lightgbm_fold
        elif name in (ENSEMBLE, AUTOML):
            assert members is not None, f"the {name} cell needs its member cells"
            fold_fn = ensemble_fold(members) if name == ENSEMBLE else automl_fold(members)
        else:
            from vforge.train import train

            fold_fn = train
    start, load, at = time.perf_counter(), os.getloadavg()[0], commit()
    cfg = compose_cell(overrides, cell, name)
    result = walk_forward(cfg, reusing(fold_fn))
    log.info("%s / %s\n%s", data, name, result.text)
    (cell / "metrics.json").write_text(json.dumps(result.metrics, indent=1))  # as python -m vforge.train writes it
    frame, horizon = result.predictions, int(cfg.data.horizon)
    folds = []
    for f in result.folds:
        keep = {k.split("/")[-1]: v for k, v in f.metrics.items() if k.startswith(("do_no_harm/", "ensemble/w_"))}
        chosen = Path(f.cfg.output_dir) / "pick.json"
        if chosen.exists():
            keep["pick"] = json.loads(chosen.read_text())["pick"]
        folds.append({"fold": f.index, "rows": len(f.test), "val_rmse": f.metrics.get("val/rmse", math.nan),
                      "best_epoch": f.metrics.get("best_epoch", math.nan), "epochs": f.metrics.get("epochs", math.nan),
                      **keep})
    record = {"data": data, "name": name, "overrides": overrides, "commit": at,
              "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "seconds": round(time.perf_counter() - start, 1), "load": [round(load, 1), round(os.getloadavg()[0], 1)],
              "train_seconds": round(sum(f.metrics.get("train_seconds", 0.0) for f in result.folds), 1),
              "scores": scores(frame, "model", horizon), "folds": folds,
              "references": {r: scores(frame, r, horizon) for r in REFERENCES if r in frame.columns},
              "members": sorted(members) if members else [], "horizon": horizon}
    (cell / "cell.json").write_text(json.dumps(record, indent=1))
    return record


def cached_cell(data: str, name: str, out: Path, compute: Callable[[], dict[str, Any]],
                members: Sequence[str] = ()) -> dict[str, Any]:
    """The cell's ``cell.json`` if it exists (for the ensemble and the pick: with these members), else
    ``compute()``."""
    path = out / data / name / "cell.json"
    if path.exists():
        record = json.loads(path.read_text())
        if name not in (ENSEMBLE, AUTOML) or record.get("members") == sorted(members):
            log.info("cached: %s", path)
            return record
        log.info("%s: members changed (%s -> %s), computing it again", path.parent, record.get("members"),
                 sorted(members))
        shutil.rmtree(path.parent)  # cheap: the members' predictions are on disk
    return compute()


# ---- the page ---------------------------------------------------------------------------------------------------

def _p(v: float) -> str:
    if not v == v:
        return "-"
    return "< 0.001" if v < 0.001 else f"{v:.3f}"


def _num(v: float, fmt: str = ".3f") -> str:
    return "-" if not v == v else format(v, fmt)


def _share(w_model: float, w_linear: float, own: str) -> str:
    parts = [f"{'' if w == 1 else f'{w:g}'}{tag}" for w, tag in ((w_model, own), (w_linear, "r")) if w]
    return "+".join(parts) or "p"


def kept(record: dict[str, Any]) -> str:
    """What do no harm kept on each fold, quoted rows / new contracts (``m`` the row's model, ``r`` the ridge,
    ``p`` persistence; the rest of each share is persistence; ``(0.5m+0.5r)+0.30t``: that blend, then LightGBM
    blended in with weight 0.30, the kept blend and the baseline sharing the rest), the ensemble's members and weights per fold, or
    what AutoML picked on each fold."""
    folds = record["folds"]
    if record["name"] == AUTOML:
        return ", ".join(LABELS.get(f.get("pick", "?"), f.get("pick", "?")) for f in folds)
    if record["name"] == ENSEMBLE:
        return "; ".join(" ".join(f"{k[2:]} {v:.2f}" for k, v in f.items() if k.startswith("w_") and v > 0.005)
                         for f in folds)
    if record["name"] == LIGHTGBM or not folds or "w_model" not in folds[0]:
        return "not gated"
    def trees(f: dict[str, Any], share: str) -> str:
        if not f.get("w_lightgbm", 0) > 0:
            return share
        return f"({share})+{f['w_lightgbm']:.2f}t"

    quoted = ", ".join(trees(f, _share(f["w_model"], f["w_linear"], "m")) for f in folds)
    new = ", ".join(trees(f, _share(f["w_model_new"], f["w_linear_new"], "m")) for f in folds)
    return f"{quoted} / {new}"


def page_rows(cells: dict[str, dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of one data option's table: the references (from the first cell that has them), then ``names``
    in order (a missing cell: a row that says so). Raises if two cells scored different persistence (other
    rows, i.e. other data or folds)."""
    have = [cells[n] for n in names if n in cells]
    rows: list[dict[str, Any]] = []
    if have:
        pers = [c["references"]["persistence"]["persistence_rmse"] for c in have]
        if not np.allclose(pers, pers[0], rtol=1e-9, atol=0):
            raise ValueError(f"cells of {have[0]['data']} scored persistence on other rows: "
                             + ", ".join(f"{c['name']} {p:.6f}" for c, p in zip(have, pers)))
        refs, commit_ = have[0]["references"], have[0]["commit"]
        rows += [{"name": r, **refs[r], "kept": "", "commit": commit_} for r in REFERENCES if r in refs]
    for n in names:
        c = cells.get(n)
        rows.append({"name": n, **c["scores"], "kept": kept(c), "commit": c["commit"]} if c else
                    {"name": n, "missing": True})
    return rows


HEADER = ["", "RMSE prev. quoted", "/ persistence", "DM p", "dates won", "RMSE all rows", "/ baseline",
          "DM p (all)", "kept per fold: quoted / new", "commit"]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: RMSE in vol points on the previously quoted rows and its ratio to persistence's on the same rows,
    DM p and dates won against persistence there; on all rows the same against the baseline; what was kept."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        label = LABELS.get(r["name"], r["name"])
        if r.get("missing"):
            lines.append(f"| {label} | not run | | | | | | | | |")
            continue
        # dates won is NaN where the predictions equal the benchmark's on every date: no test to speak of
        same, same_all = not r["won"] == r["won"], not r["baseline_won"] == r["baseline_won"]
        all_rows = r["all_rmse"] == r["all_rmse"]  # persistence has no all-row score
        cells = [label, _num(r["prev_rmse"]), _num(r["prev_rmse"] / r["persistence_rmse"]) + "x",
                 "-" if same else _p(r["dm_p"]), _num(r["won"], ".0%"), _num(r["all_rmse"]),
                 _num(r["all_rmse"] / r["baseline_rmse"]) + "x" if all_rows else "-",
                 "-" if same_all or not all_rows else _p(r["baseline_dm_p"]), r["kept"], r["commit"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def head_to_head(a: pd.DataFrame, b: pd.DataFrame, horizon: int = 0) -> dict[str, float]:
    """One-sided DM p (small: ``a``'s ``model`` better) and share of dates won of ``a`` against ``b``, two
    predictions frames of the same rows: on the previously quoted rows (``dm_p``, ``won``) and on all rows."""
    if not (a[KEY].equals(b[KEY]) and np.array_equal(a["market"], b["market"])):
        raise ValueError("head_to_head: the two frames hold other rows (cells of other data, folds or commits)")
    dates, y = a["target_date"].to_numpy(), a["market"].to_numpy(np.float64)
    pa, pb = a["model"].to_numpy(np.float64), b["model"].to_numpy(np.float64)
    dm, won = sig.compare(dates, pa, pb, y, a["prev_quoted"].to_numpy(bool), horizon=horizon + 1)
    dm_all, won_all = sig.compare(dates, pa, pb, y, horizon=horizon + 1)
    return {"dm_p": dm.pvalue, "won": won, "dm_p_all": dm_all.pvalue, "won_all": won_all}


def pick_lines(out: Path, data: str, cells: dict[str, dict[str, Any]]) -> str:
    """The AutoML pick (its cell) against LightGBM, linear and persistence, tested head to head on the same rows."""
    if AUTOML not in cells:
        return ""
    c = cells[AUTOML]
    text = f"AutoML's pick per fold: **{kept(c)}**; against persistence DM p {_p(c['scores']['dm_p'])} on quoted rows"
    frames = {n: pd.read_parquet(out / data / n / "predictions" / "test.parquet")
              for n in (AUTOML, LIGHTGBM, "linear") if n in cells}
    for other in (LIGHTGBM, "linear"):
        if other not in frames:
            continue
        h = head_to_head(frames[AUTOML], frames[other], int(c.get("horizon", 0)))
        if not h["won"] == h["won"] and not h["won_all"] == h["won_all"]:
            text += f"; the same predictions as {LABELS[other]}"
            continue
        text += (f"; against {LABELS[other]} DM p {_p(h['dm_p'])} on quoted rows (won {_num(h['won'], '.0%')} of "
                 f"dates), {_p(h['dm_p_all'])} on all rows (won {_num(h['won_all'], '.0%')})")
    return text + "."


def page(out: Path, data_names: Sequence[str], names: Sequence[str]) -> str:
    """The page for ``data_names`` from the ``cell.json`` files under ``out``."""
    parts = []
    for d in data_names:
        cells = {n: json.loads(p.read_text()) for n in names
                 for p in [out / d / n / "cell.json"] if p.exists()}
        rows = page_rows(cells, names)
        any_cell = next(iter(cells.values()), None)
        head = f"#### `{d}`"
        if any_cell:
            head += "".join(f" `{Path(o.split('=', 1)[1]).name}`" for o in any_cell["overrides"]
                            if o.startswith("data.path="))
            ref = any_cell["references"]["persistence"]
            settings = " ".join(o for o in any_cell["overrides"] if o.startswith("trainer.") and
                                o != "trainer.num_threads=1")
            loads = [c["load"] for c in cells.values()]
            head += (f" ({int(ref['n_dates'])} out-of-sample dates, {int(ref['rows']):,} rows of which "
                     f"{int(ref['prev_rows']):,} previously quoted; {settings or 'default trainer'}, one thread; load average "
                     f"{min(min(x) for x in loads):.0f}-{max(max(x) for x in loads):.0f})")
        parts.append(f"{head}\n\n{markdown_table(rows)}\n\n{pick_lines(out, d, cells)}".rstrip())
    return "\n\n".join(parts)


def results(args: argparse.Namespace) -> None:
    out = Path(args.out)
    extra = [*args.overrides, *([f"trainer.max_epochs={args.epochs}"] if args.epochs else []),
             *([f"trainer.patience={args.patience}"] if args.patience else [])]
    names = [*args.models, *([ENSEMBLE, AUTOML] if args.ensemble else [])]
    if not args.table:
        for d in args.data:
            for n in args.rerun or []:
                if (out / d / n).exists():
                    shutil.rmtree(out / d / n)
            for m in args.models:
                cached_cell(d, m, out, partial(run_cell, d, m, out, extra))
            members = {m: out / d / m for m in args.models if (out / d / m / "cell.json").exists()}
            if args.ensemble and len(members) >= 2:
                for n in (ENSEMBLE, AUTOML):
                    cached_cell(d, n, out, partial(run_cell, d, n, out, extra, members=members), members=list(members))
    text = page(out, args.data, names)
    (out / "results.md").write_text(text + "\n")
    print(text)


def add_parser(sub: Any) -> None:
    r = sub.add_parser("results", help="the README's results page: walk-forward cells of every predictor")
    r.add_argument("overrides", nargs="*", help="extra overrides for every cell (after --)")
    r.add_argument("--data", nargs="+", default=["synthetic", "synthetic_messy", "china50etf"])
    r.add_argument("--models", nargs="+", default=list(MODELS))
    r.add_argument("--no-ensemble", dest="ensemble", action="store_false")
    r.add_argument("--epochs", type=int, help="trainer.max_epochs for every data option (say so when you quote it)")
    r.add_argument("--patience", type=int)
    r.add_argument("--rerun", nargs="*", help="cells computed again (e.g. after a change to do no harm)")
    r.add_argument("--table", action="store_true", help="only rebuild the page from the cached cells")
    r.add_argument("--out", default="outputs/accuracy_results")
