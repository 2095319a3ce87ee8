"""scripts/bench_data.py's synthetic chain: the rows it promises and contracts that persist from day to day."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_data as B  # noqa: E402


def test_the_bench_chain_has_its_rows_and_persistent_contracts(tmp_path):
    n_dates, n_strikes = B.layout(30_000)
    assert (n_dates, n_strikes) == (250, 5)  # 30,000 rows: 250 dates x 12 expiries x 5 strikes x C/P
    rows = B.write_chain(tmp_path, 30_000, per="year")
    df = pd.concat(pd.read_parquet(f) for f in sorted(tmp_path.glob("*.parquet")))
    assert rows == len(df) == n_dates * B.N_EXPIRIES * n_strikes * 2 and len(list(tmp_path.glob("*"))) == 1
    key = ["expiry", "strike", "option_type"]
    dates = sorted(df.quote_date.unique())
    today, before = (set(map(tuple, df[df.quote_date == d][key].to_numpy())) for d in (dates[100], dates[99]))
    assert len(today - before) <= 2 * n_strikes  # at most one new expiry listed from one day to the next
    assert (df.expiry > df.quote_date).all() and df.implied_volatility.between(0.03, 3.0).all()
