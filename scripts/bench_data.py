"""Time the data pipeline (read -> checks -> features -> split -> tensors) on a synthetic chain of N rows on disk.

    python scripts/bench_data.py --rows 1000000 [--per year|date] [--chunk-rows 1000000 | --in-memory] [--keep]

Writes a chain of ``--rows`` rows as Parquet files (one per year, or one per quote date) into a temp folder
outside the repository, then runs ``data=chain data.path='<folder>/*.parquet' data.chunk_rows=<n>`` (the chunked
pipeline: files read a chunk at a time, splits memory-mapped from files in the temp folder; ``--in-memory``: the
whole chain at once) in a child process, so that its peak memory is the pipeline's alone, and ends with one line::

    rows=<N> seconds=<s> peak_rss_mb=<m>

The chain has persistent contracts: monthly expiries a year out, a fixed strike grid, a mean-reverting spot
(so strikes stay near the money), and a smile whose level, skew and term structure move day to day, with
``implied_volatility`` given (no inversion). Quote dates scale with N (250 to 2,520, ten years of trading days)
and contracts per date make up the rest: 1M rows is 500 dates of 2,000 contracts, 20M is 2,520 of 7,936.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
N_EXPIRIES = 12


def layout(rows: int) -> tuple[int, int]:
    """(quote dates, strikes per expiry and type) for about ``rows`` rows."""
    n_dates = int(np.clip(rows // 2000, 250, 2520))
    return n_dates, max(2, round(rows / n_dates / (2 * N_EXPIRIES)))


def write_chain(folder: Path, rows: int, per: str = "year", seed: int = 0) -> int:
    """Write the chain into ``folder``; returns the number of rows written."""
    rng = np.random.default_rng(seed)
    n_dates, n_strikes = layout(rows)
    dates = pd.bdate_range("2010-01-04", periods=n_dates)
    # log spot: OU around log(100) (daily vol 1%, half-life ~ 3 months); ATM vol level: OU around 20%
    x, level = np.zeros(n_dates), np.full(n_dates, 0.2)
    for t in range(1, n_dates):
        x[t] = x[t - 1] * (1 - 1 / 90) + 0.01 * rng.standard_normal()
        level[t] = level[t - 1] + (0.2 - level[t - 1]) / 30 + 0.01 * rng.standard_normal()
    level = np.clip(level, 0.05, 0.8)
    spot = 100 * np.exp(x)
    strikes = np.round(100 * np.exp(np.linspace(-0.35, 0.35, n_strikes)), 2)
    month_ends = pd.date_range(dates[0], dates[-1] + pd.DateOffset(years=1, months=1), freq="WOM-3FRI")
    written = 0
    groups = dates.year if per == "year" else np.arange(n_dates)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        d = dates[idx]
        # the next N_EXPIRIES monthly expiries after each date: (dates, N_EXPIRIES)
        first = np.searchsorted(month_ends.values, d.values, side="right")
        exp = month_ends.values[first[:, None] + np.arange(N_EXPIRIES)]
        shape = (len(idx), N_EXPIRIES, n_strikes, 2)  # date, expiry, strike, C/P
        tau = np.broadcast_to(((exp - d.values[:, None]) / np.timedelta64(365, "D"))[:, :, None, None], shape)
        s = np.broadcast_to(spot[idx][:, None, None, None], shape)
        k = np.log(np.broadcast_to(strikes[None, None, :, None], shape) / s)
        atm = np.broadcast_to(level[idx][:, None, None, None], shape) * (1 + 0.1 * np.exp(-4 * tau))
        iv = atm - 0.15 * k / np.sqrt(tau + 0.05) + 0.3 * k**2 + 0.002 * rng.standard_normal(shape)
        frame = pd.DataFrame({
            "quote_date": np.broadcast_to(d.values[:, None, None, None], shape).ravel(),
            "expiry": np.broadcast_to(exp[:, :, None, None], shape).ravel(),
            "strike": np.broadcast_to(strikes[None, None, :, None], shape).ravel(),
            "option_type": np.broadcast_to(np.array(["C", "P"])[None, None, None, :], shape).ravel(),
            "underlying_price": s.ravel(),
            "implied_volatility": np.clip(iv, 0.03, 3.0).ravel(),
        })
        name = f"chain_{g}.parquet" if per == "year" else f"chain_{d[0]:%Y-%m-%d}.parquet"
        frame.to_parquet(folder / name, index=False)
        written += len(frame)
    return written


def run_pipeline(glob: str, chunk_rows: int, cache_dir: str) -> None:
    """In the child: compose data=chain over the files and build the Dataset; print seconds and peak RSS."""
    import resource

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import vforge.data.chain  # noqa: F401 - imports (torch ~3-20 s) are not the pipeline's time

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        chunked = [f"data.chunk_rows={chunk_rows}", f"data.cache_dir={cache_dir}"] if chunk_rows else []
        cfg = compose("train", overrides=["data=chain", f"data.path={glob}", *chunked])
    start = time.perf_counter()
    data = instantiate(cfg.data, _convert_="all")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    print(f"model rows: train {len(data.train):,}  val {len(data.val):,}  test {len(data.test):,}")
    print(f"pipeline seconds={seconds:.1f} peak_rss_mb={peak:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--per", choices=["year", "date"], default="year", help="one Parquet file per year or date")
    parser.add_argument("--chunk-rows", type=int, default=1_000_000, help="rows read and featurized at a time")
    parser.add_argument("--in-memory", action="store_true", help="the whole chain at once (data.chunk_rows=null)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed)")
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)  # internal: run the pipeline on this glob
    args = parser.parse_args()
    if args.pipeline:
        run_pipeline(args.pipeline, 0 if args.in_memory else args.chunk_rows, str(Path(args.pipeline).parent / "cache"))
        return
    folder = Path(tempfile.mkdtemp(prefix="vforge-bench-data-"))
    try:
        start = time.perf_counter()
        rows = write_chain(folder, args.rows, args.per)
        size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        print(f"wrote {rows:,} rows in {len(list(folder.iterdir()))} files ({size:.0f} MB) to {folder} "
              f"in {time.perf_counter() - start:.1f} s")
        mode = ["--in-memory"] if args.in_memory else ["--chunk-rows", str(args.chunk_rows)]
        out = subprocess.run([sys.executable, __file__, "--pipeline", str(folder / "*.parquet"), *mode], cwd=ROOT,
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"pipeline failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
        print(out.stdout, end="")
        last = out.stdout.strip().splitlines()[-1].removeprefix("pipeline ")
        print(f"rows={rows} {last}")
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
