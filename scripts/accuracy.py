"""Accuracy of the default command on data nobody tuned for, and walk-forward accuracy of models on one data option.

Suite (the honest harness of issue 10): the default command (holdout, default model, do no harm) on several seeds of
several data options; its test RMSE on the previously quoted rows over persistence's, as a distribution::

    python scripts/accuracy.py suite --groups default messy messy_calls thin china50etf [--epochs 12] [-- overrides]

Each (group, seed) trains once with the do-no-harm step off (``<out>/<group>-<seed>/model.pt``, kept: a second call
reuses it) and then applies the do-no-harm step of the code as it is now to the trained network, exactly as the
default command does after training; so a change to the selection rule is measured again in seconds. Seeds are split
into ``tune`` seeds (look at them while developing) and ``held-out`` seeds (report them, never tune on them); the
summary gives the median and the worst ratio of each (group, kind). JSON lines of every run go to ``<out>/suite.jsonl``.

Folds: each (model, fold) of the existing chronological folds (data.n_folds/fold) is one ``train(cfg)``::

    python scripts/accuracy.py folds data=china50etf --models linear mlp --folds 4 [-- extra overrides]

with per-fold test RMSE on all rows and on previously quoted rows beside the baseline and persistence, and the folds
pooled (root mean square over folds).

AutoML: ``python -m vforge.automl`` (its default budget) on each (group, seed), and what its pick scores on test
beside the references and the old rule (the lowest validation RMSE among the models and the ensemble), as ratios
to persistence on the previously quoted test rows; a sweep folder with a leaderboard is reused::

    python scripts/accuracy.py automl --groups china_thin_calls china_thin --kind tune [-- overrides]

Results: the README's results page, walk-forward cells of every predictor on several data options, resumable
(``scripts/results_page.py``)::

    python scripts/accuracy.py results --data synthetic synthetic_messy china50etf [--epochs N] [-- overrides]

Diagnose: where a run loses to persistence, from its ``predictions/*.parquet`` (``scripts/diagnose.py``)::

    python scripts/accuracy.py diagnose outputs/runs/<time>_mlp
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from vforge.train import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
import diagnose  # noqa: E402
import heston_panel  # noqa: E402
import results_page  # noqa: E402
import thin_panels  # noqa: E402

CONF = str(Path(__file__).resolve().parents[1] / "conf")

# group -> (overrides, tune seeds, held-out seeds); a seed of None: the option's own configured seed; of the real
# thin groups (THIN), the start of a 68-date window cut from the 50ETF history (scripts/thin_panels.py); of
# ``heston``, a QuantLib-priced market (scripts/heston_panel.py VARIANTS: held out, never tuned on).
GROUPS: dict[str, tuple[list[str], list[Any], list[Any]]] = {
    "default": ([], [None], [8, 9]),
    "messy": (["data=synthetic_messy"], [11, 12], [21, 22]),
    "messy_calls": (["data=synthetic_messy", "data.calls_only=true"], [11, 12], [21, 22]),
    "thin": (["data=synthetic_messy_thin"], [11, 12, 13], [21, 22, 23]),
    "china50etf": (["data=china50etf"], [None], []),
    "china_thin_calls": (thin_panels.OVERRIDES, thin_panels.TUNE, thin_panels.HELD_OUT),
    "china_thin": (thin_panels.OVERRIDES, thin_panels.TUNE, thin_panels.HELD_OUT),
    "heston": (["data=chain"], [], list(heston_panel.VARIANTS)),
}
THIN = {"china_thin_calls": "calls", "china_thin": "both"}


def seed_overrides(group: str, seed: Any, out: Path) -> list[str]:
    """What picks one seed of a group: ``data.seed``, or the window of a real thin group (cut once under ``out``)."""
    if group in THIN:
        return [f"data.path={thin_panels.cut(seed, THIN[group], out / 'panels')}"]
    if group == "heston":
        return [f"data.path={heston_panel.write(seed, out / 'panels')}"]
    return [f"data.seed={seed}"] if seed is not None else []


def compose_cfg(overrides: list[str], out: Path, run_name: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", *overrides])
    with open_dict(cfg):
        cfg.output_dir, cfg.run_name = str(out), run_name
    return cfg


def run(overrides: list[str], model: str, n_folds: int, fold: int, out: Path) -> dict:
    cfg = compose_cfg([f"model={model}", f"data.n_folds={n_folds}", f"data.fold={fold}", *overrides], out, model)
    return train(cfg)


def prev_quoted_ratio(level: np.ndarray, split: Any) -> float:
    """Test RMSE of ``level`` on the previously quoted rows over persistence's on them."""
    prev = np.isfinite(split.persistence)
    model = np.sqrt(np.mean((level[prev] - split.iv[prev]) ** 2))
    return float(model / np.sqrt(np.mean((split.persistence[prev] - split.iv[prev]) ** 2)))


def suite_one(group: str, seed: Any, kind: str, extra: list[str], out: Path) -> dict:
    """Train (once) and gate one (group, seed); the row of the suite table."""
    from vforge.training.boosting import blend_lightgbm
    from vforge.training.gating import do_no_harm
    from vforge.training.loop import predict

    overrides = [*GROUPS[group][0], *seed_overrides(group, seed, out), "evaluation.plots=false", *extra]
    run_dir = out / f"{group}-{seed if seed is not None else 'default'}"
    cfg = compose_cfg(overrides, run_dir, f"mlp-{group}")
    start = time.perf_counter()
    if not (run_dir / "model.pt").exists():
        raw_cfg = cfg.copy()
        with open_dict(raw_cfg):
            raw_cfg.do_no_harm.enabled = False
        train(raw_cfg)
    trained = time.perf_counter() - start
    saved = torch.load(run_dir / "model.pt", weights_only=False)
    data = instantiate(cfg.data, _convert_="all")
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    config["model"] = saved["config"]["model"]  # as trained (trainer.n_seeds: the seeds' average)
    net = instantiate(config["model"], n_num=data.n_num, cat_cardinalities=data.cat_cardinalities, d_out=1)
    net.load_state_dict(saved["state_dict"])
    net.eval()
    kept = blend_lightgbm(cfg.do_no_harm, do_no_harm(cfg.do_no_harm, net, data, config, d_out=1), data, d_out=1,
                          seed=int(cfg.seed), n_threads=int(cfg.trainer.num_threads or 2))
    level = {name: data.to_level(predict(m, data.test), data.test) for name, m in (("final", kept.module),
                                                                                   ("net", net))}
    dropped = data.report.get("dropped", {})
    return {"group": group, "seed": seed, "kind": kind, "ratio": prev_quoted_ratio(level["final"], data.test),
            "net_ratio": prev_quoted_ratio(level["net"], data.test), **kept.metrics,
            "test_dates": int(len(np.unique(data.test.aux["quote_date_idx"].numpy()))),
            "short_dropped": int(sum(v for k, v in dropped.items() if "short_expiry" in k or "days to expiry" in k)),
            "note": kept.note.strip(), "train_seconds": round(trained, 1),
            "gate_seconds": round(time.perf_counter() - start - trained, 1)}


def summary(rows: list[dict]) -> str:
    lines = [f"{'group':<17}{'kind':<10}{'n':>3}{'median':>8}{'geo':>7}{'worst':>8}{'best':>8}{'>1':>4}{'net med':>8}  "
             "ratios (test RMSE on prev. quoted rows / persistence's)"]
    for group in dict.fromkeys(r["group"] for r in rows):
        for kind in ("tune", "held-out"):
            mine = [r for r in rows if r["group"] == group and r["kind"] == kind]
            if not mine:
                continue
            ratios = np.array([r["ratio"] for r in mine])
            nets = np.array([r["net_ratio"] for r in mine])
            lines.append(f"{group:<17}{kind:<10}{len(mine):>3}{np.median(ratios):>8.3f}"
                         f"{np.exp(np.log(ratios).mean()):>7.3f}{ratios.max():>8.3f}{ratios.min():>8.3f}"
                         f"{int((ratios > 1.0005).sum()):>4}{np.median(nets):>8.3f}  "
                         + " ".join(f"{r['seed']}:{r['ratio']:.3f}" for r in mine))
    return "\n".join(lines)


def suite(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [*args.overrides, *([f"trainer.max_epochs={args.epochs}"] if args.epochs else []),
             *([f"trainer.patience={args.patience}"] if args.patience else [])]
    rows = []
    for group in args.groups:
        _, tune, held = GROUPS[group]
        for kind, seeds in (("tune", tune), ("held-out", held)):
            for seed in seeds:
                if args.kind and kind != args.kind:
                    continue
                row = suite_one(group, seed, kind, extra, out)
                rows.append(row)
                print(json.dumps(row), flush=True)
                with open(out / "suite.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
    print("\n" + summary(rows))


def automl_one(group: str, seed: Any, kind: str, extra: list[str], out: Path, repick: bool = False) -> dict:
    """One AutoML sweep (run once: its leaderboard is reused) and the test ratios of its rows. ``repick``: the
    finished sweep's leaderboard built again by the code as it is (its Optuna studies resumed from the sweep's
    ``optuna.db`` with no trial left to run), the earlier one kept as ``leaderboard.prev.csv`` (``prev_*``)."""
    import os
    import subprocess

    import pandas as pd

    sweep = out / f"{group}-{seed if seed is not None else 'default'}"
    board, prev = sweep / "leaderboard.csv", sweep / "leaderboard.prev.csv"
    start = time.perf_counter()
    resume: list[str] = []
    if repick and board.exists():
        if not prev.exists():
            board.rename(prev)
        board.unlink(missing_ok=True)
        resume = [f"hydra.sweeper.storage=sqlite:///{sweep / 'optuna.db'}"]
    if not board.exists():
        cmd = [sys.executable, "-m", "vforge.automl", *GROUPS[group][0], *seed_overrides(group, seed, out),
               "logger=none", "evaluation.plots=false", f"hydra.sweep.dir={sweep}", *resume, *extra]
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        done = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
        (out / f"{sweep.name}{'.repick' if resume else ''}.log").write_text(done.stdout + done.stderr)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    rows = pd.read_csv(board)
    bench = float(rows.loc[rows["name"] == "persistence", "test_prev_quoted_rmse"].iloc[0])
    ratio = lambda r: float(r["test_prev_quoted_rmse"]) / bench  # noqa: E731
    named = {n: ratio(rows[rows["name"] == n].iloc[0]) for n in ("linear", "lightgbm") if (rows["name"] == n).any()}
    cands = rows[rows["kind"].isin(["model", "ensemble"])]
    old = cands.loc[cands["val_rmse"].idxmin()]
    before = {}
    if prev.exists():
        first = pd.read_csv(prev).iloc[0]
        before = {"prev_pick": first["name"], "prev_ratio": float(first["test_prev_quoted_rmse"]) / bench}
    return {"group": group, "seed": seed, "kind": kind, "pick": rows.iloc[0]["name"], "ratio": ratio(rows.iloc[0]),
            "old_pick": old["name"], "old_ratio": ratio(old), **named, **before,
            "seconds": round(time.perf_counter() - start)}


def automl_summary(rows: list[dict]) -> str:
    cols = ["ratio", *(["prev_ratio"] if any("prev_ratio" in r for r in rows) else []), "old_ratio", "linear",
            "lightgbm"]
    lines = [f"{'group':<17}{'kind':<10}{'n':>3}  " + "".join(f"{c + ' geo/med/worst/>1':>34}" for c in cols)]
    for group in dict.fromkeys(r["group"] for r in rows):
        for kind in ("tune", "held-out"):
            mine = [r for r in rows if r["group"] == group and r["kind"] == kind]
            if not mine:
                continue
            cells = []
            for c in cols:
                v = np.array([r.get(c, math.nan) for r in mine], dtype=float)
                v = v[np.isfinite(v)]
                cells.append(f"{np.exp(np.log(v).mean()):.3f}/{np.median(v):.3f}/{v.max():.3f}/"
                             f"{int((v > 1.0005).sum())}" if len(v) else "-")
            lines.append(f"{group:<17}{kind:<10}{len(mine):>3}  " + "".join(f"{c:>34}" for c in cells))
    return "\n".join(lines)


def automl(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for group in args.groups:
        _, tune, held = GROUPS[group]
        for kind, seeds in (("tune", tune), ("held-out", held)):
            for seed in seeds if not args.kind or kind == args.kind else []:
                row = automl_one(group, seed, kind, list(args.overrides), out, args.repick)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n" + automl_summary(rows))


def folds(args: argparse.Namespace) -> None:
    rows = []
    for model in args.models:
        for fold in args.only if args.only is not None else range(args.folds):
            start = time.perf_counter()
            m = run(args.overrides, model, args.folds, fold, Path(args.out) / f"{model}-{fold}")
            row = {"model": model, "fold": fold, "seconds": round(time.perf_counter() - start, 1),
                   **{k: m.get(f"test/{k}", math.nan) for k in ("rmse", "baseline_rmse", "prev_quoted_rmse",
                                                                 "persistence_rmse")},
                   "w_model": m.get("do_no_harm/w_model", 1.0), "w_linear": m.get("do_no_harm/w_linear", 0.0)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'model':<16}{'fold':>5}{'all':>8}{'base':>8}{'ratio':>7}{'prevq':>8}{'persist':>8}{'ratio':>7}"
          f"{'w_m':>6}{'w_l':>6}")
    keys = ("rmse", "baseline_rmse", "prev_quoted_rmse", "persistence_rmse")
    for model in args.models:
        mine = [r for r in rows if r["model"] == model]
        pooled = {"fold": "pool", **{k: math.sqrt(sum(x[k] ** 2 for x in mine) / len(mine)) for k in keys},
                  "w_model": math.nan, "w_linear": math.nan}
        for r in [*mine, pooled]:
            print(f"{model:<16}{r['fold']!s:>5}{r['rmse']:8.3f}{r['baseline_rmse']:8.3f}"
                  f"{r['rmse'] / r['baseline_rmse']:7.3f}{r['prev_quoted_rmse']:8.3f}{r['persistence_rmse']:8.3f}"
                  f"{r['prev_quoted_rmse'] / r['persistence_rmse']:7.3f}{r['w_model']:6.2f}{r['w_linear']:6.2f}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("suite", help="the default command over seeds and data options")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    s.add_argument("--kind", choices=["tune", "held-out"], help="only these seeds (default: both)")
    s.add_argument("--epochs", type=int, help="trainer.max_epochs (CPU is scarce; say so when you quote a figure)")
    s.add_argument("--patience", type=int)
    s.add_argument("--out", default="outputs/accuracy_suite")
    f = sub.add_parser("folds", help="models on the chronological folds of one data option")
    f.add_argument("overrides", nargs="*")
    f.add_argument("--models", nargs="+", default=["linear", "mlp"])
    f.add_argument("--folds", type=int, default=4)
    f.add_argument("--only", type=int, nargs="*", help="fold indices to run (default: all)")
    f.add_argument("--out", default="outputs/accuracy")
    a = sub.add_parser("automl", help="AutoML's pick against the references over seeds and data options")
    a.add_argument("overrides", nargs="*")
    a.add_argument("--groups", nargs="+", default=["china_thin_calls", "china_thin"], choices=list(GROUPS))
    a.add_argument("--kind", choices=["tune", "held-out"], help="only these seeds (default: both)")
    a.add_argument("--out", default="outputs/accuracy_automl")
    a.add_argument("--repick", action="store_true", help="finished sweeps: their leaderboards built again by this "
                   "code, no trial run (the earlier leaderboard kept as leaderboard.prev.csv)")
    results_page.add_parser(sub)
    diagnose.add_parser(sub)
    args = p.parse_args()
    {"suite": suite, "folds": folds, "automl": automl, "results": results_page.results, "diagnose": diagnose.main}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
