"""Time to generate the synthetic market (one year by default) and to prepare it, cache bypassed.

    python scripts/bench_synthetic.py [--n-days 250] [--repeat 2]

Prints quotes generated, seconds for ``generate_chain`` (path + listing + COS pricing + quotes),
for the loader's checks (IV inversion from the mid, filters) and for ``prepare`` (features, split).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from omegaconf import OmegaConf

from vforge.data.chain import normalize
from vforge.data.dataset import format_report, prepare
from vforge.data.synthetic import generate_chain

CONF = Path(__file__).resolve().parents[1] / "conf" / "data" / "synthetic.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-days", type=int, default=250)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    cfg = OmegaConf.to_container(OmegaConf.load(CONF))
    params = {k: cfg[k] for k in ("seed", "spot0", "rate", "dividend_yield", "heston", "jumps", "listing", "quotes")}
    params["n_days"] = args.n_days

    best = {}
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        raw = generate_chain(**params)
        t1 = time.perf_counter()
        report: dict = {}
        chain = normalize(raw, columns={}, iv_unit="decimal", rate=cfg["rate"], dividend_yield=cfg["dividend_yield"],
                          report=report, max_spread_vol=cfg["max_spread_vol"])
        t2 = time.perf_counter()
        ds = prepare(chain, features=cfg["features"], target=cfg["target"], horizon=cfg["horizon"],
                     val_fraction=cfg["val_fraction"], test_fraction=cfg["test_fraction"], source="synthetic")
        t3 = time.perf_counter()
        for k, v in (("generate", t1 - t0), ("load checks", t2 - t1), ("prepare", t3 - t2)):
            best[k] = min(best.get(k, float("inf")), v)
    ds.report["dropped"] = {**report["dropped"], **ds.report["dropped"]}
    ds.report["loaded"] = report["loaded"]
    print(format_report(ds.report))
    print(f"{args.n_days} days, {len(raw):,} listed quotes: generate {best['generate']:.2f} s, "
          f"load checks {best['load checks']:.2f} s, prepare {best['prepare']:.2f} s (best of {args.repeat})")


if __name__ == "__main__":
    main()
