"""Walk-forward accuracy of models on one data option, from the existing chronological folds (data.n_folds/fold).

    python scripts/accuracy.py data=china50etf --models linear mlp --folds 4 [-- extra overrides]

Each (model, fold) is one ``train(cfg)`` with ``logger=none``; the table gives per-fold test RMSE on all rows and on
previously quoted rows beside the baseline and persistence, and the folds pooled (root mean square over folds).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from vforge.train import train

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def run(overrides: list[str], model: str, n_folds: int, fold: int, out: Path) -> dict:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", "logger=none", f"data.n_folds={n_folds}",
                                          f"data.fold={fold}", *overrides])
    with open_dict(cfg):
        cfg.output_dir, cfg.run_name = str(out), model
    return train(cfg)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser()
    p.add_argument("overrides", nargs="*")
    p.add_argument("--models", nargs="+", default=["linear", "mlp"])
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--only", type=int, nargs="*", help="fold indices to run (default: all)")
    p.add_argument("--out", default="outputs/accuracy")
    args = p.parse_args()
    rows = []
    for model in args.models:
        for fold in args.only if args.only is not None else range(args.folds):
            start = time.perf_counter()
            m = run(args.overrides, model, args.folds, fold, Path(args.out) / f"{model}-{fold}")
            row = {"model": model, "fold": fold, "seconds": round(time.perf_counter() - start, 1),
                   **{k: m.get(f"test/{k}", math.nan) for k in ("rmse", "baseline_rmse", "matched_rmse",
                                                                 "persistence_rmse")},
                   "w_model": m.get("do_no_harm/w_model", 1.0), "w_linear": m.get("do_no_harm/w_linear", 0.0)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'model':<16}{'fold':>5}{'all':>8}{'base':>8}{'ratio':>7}{'prevq':>8}{'persist':>8}{'ratio':>7}"
          f"{'w_m':>6}{'w_l':>6}")
    for model in args.models:
        mine = [r for r in rows if r["model"] == model]
        for r in mine + [{"fold": "pool", **{k: math.sqrt(sum(x[k] ** 2 for x in mine) / len(mine))
                                             for k in ("rmse", "baseline_rmse", "matched_rmse", "persistence_rmse")},
                          "w_model": math.nan, "w_linear": math.nan}]:
            print(f"{model:<16}{r['fold']!s:>5}{r['rmse']:8.3f}{r['baseline_rmse']:8.3f}"
                  f"{r['rmse'] / r['baseline_rmse']:7.3f}{r['matched_rmse']:8.3f}{r['persistence_rmse']:8.3f}"
                  f"{r['matched_rmse'] / r['persistence_rmse']:7.3f}{r['w_model']:6.2f}{r['w_linear']:6.2f}")


if __name__ == "__main__":
    sys.exit(main())
