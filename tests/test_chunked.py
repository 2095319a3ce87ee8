"""The chunked pipeline (``data.chunk_rows``) against the in-memory one on a small chain split across files: the
same tensors, rows, quotes, train-only statistics and report, features across chunk boundaries included."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vforge.data import chain as C
from vforge.data import dataset as D
from vforge.data.synthetic import generate_chain

SMALL = dict(seed=5, n_days=45, spot0=100.0, rate=0.02, dividend_yield=0.01,
             heston=dict(kappa=2.0, theta=0.04, sigma=0.6, rho=-0.7, v0=0.04),
             jumps=dict(intensity=0.0, mean=0.0, std=0.0),
             listing=dict(n_monthlies=3, n_weeklies=2, strike_step=5.0, moneyness_range=[0.8, 1.2]),
             quotes=dict(half_spread_vol=0.0025, missing_fraction=0.05))
OPTIONS = dict(rate=0.02, dividend_yield=0.01, max_spread_vol=0.05, min_days=5, iv_range=[0.01, 1.5],
               features=["log_moneyness", "tau", "moneyness_std", "spot_ret_1d_vol", "prev_iv_missing", "prev_iv_resid",
                         "gap_days", "sticky_moneyness_change", "prev_smile_slope", "realized_vol_21d", "spot_ret_21d"],
               cat_features=["option_type", "expiry_cycle"], target="change", val_fraction=0.2, test_fraction=0.2,
               winsorize=0.01)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[str, list[pd.Timestamp], list[pd.Timestamp]]:
    """The chain as one Parquet file per 7 quote dates (7 files), and each file's first and last date."""
    folder = tmp_path_factory.mktemp("chain")
    raw = generate_chain(**SMALL)
    dates = np.sort(raw["quote_date"].unique())
    firsts, lasts = [], []
    for i in range(0, len(dates), 7):
        week = dates[i:i + 7]
        raw[raw["quote_date"].isin(week)].to_parquet(folder / f"chain_{i:03d}.parquet", index=False)
        firsts.append(pd.Timestamp(week[0]))
        lasts.append(pd.Timestamp(week[-1]))
    return str(folder / "*.parquet"), firsts, lasts


def both(files, tmp_path, chunk_rows: int = 1, **options) -> tuple[D.Dataset, D.Dataset]:
    """In memory, and chunked (chunk_rows=1: every quote date a chunk of its own; 400: two files read at a time,
    cut into chunks of about 10 dates)."""
    glob = files[0]
    opts = {**OPTIONS, **options}
    return C.load(path=glob, **opts), C.load(path=glob, chunk_rows=chunk_rows, cache_dir=str(tmp_path), **opts)


def plain(df: pd.DataFrame) -> pd.DataFrame:
    return df.astype({"option_type": str})  # categorical codes on disk, strings in memory


@pytest.mark.parametrize(("horizon", "chunk_rows"), [
    pytest.param(0, 1, marks=pytest.mark.slow), pytest.param(1, 1, marks=pytest.mark.slow), (0, 400), (2, 400)])
def test_chunked_gives_the_in_memory_dataset(files, tmp_path, horizon, chunk_rows):
    memory, chunked = both(files, tmp_path, chunk_rows, horizon=horizon)
    assert chunked.report == memory.report  # drop counts, rows, split dates, baseline RMSE, winsorizing
    # train-only statistics: per chunk, combined; equal to the one-frame ones
    np.testing.assert_allclose(chunked.x_mean, memory.x_mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(chunked.x_std, memory.x_std, rtol=1e-12)
    assert (chunked.y_center, chunked.y_scale, chunked.cat_vocab) == (memory.y_center, memory.y_scale, memory.cat_vocab)
    for name in ("train", "val", "test"):
        a, b = getattr(memory, name), getattr(chunked, name)
        assert len(a) == len(b) > 0
        # features scaled by statistics equal to ~1e-16: float32 equality up to one rounding
        np.testing.assert_allclose(b.x_num.numpy(), a.x_num.numpy(), rtol=1e-6, atol=1e-6)
        assert np.array_equal(b.x_cat.numpy(), a.x_cat.numpy()) and np.array_equal(b.y.numpy(), a.y.numpy())
        for k in ("iv", "base", "persistence"):
            assert np.array_equal(getattr(b, k), getattr(a, k), equal_nan=True), k
        assert a.aux.keys() == b.aux.keys()
        for k in a.aux:
            assert np.array_equal(b.aux[k].numpy(), a.aux[k].numpy(), equal_nan=True), k
        pd.testing.assert_frame_equal(plain(b.rows), plain(a.rows), check_exact=True)
        assert isinstance(b.iv, np.memmap)
    pd.testing.assert_frame_equal(plain(chunked.quotes), plain(memory.quotes), check_exact=True)
    pd.testing.assert_frame_equal(chunked.last_chain, memory.last_chain)
    assert not list(tmp_path.iterdir())  # the memory-mapped files are gone from the cache: nothing left behind


def test_rows_across_a_chunk_boundary_keep_the_previous_date(files, tmp_path):
    """A row whose previous quote date is the last date of the file before has its own previous IV (not the
    surface fallback), the same features as in memory, and none of them is lost."""
    memory, chunked = both(files, tmp_path, 400, horizon=0)
    _, firsts, lasts = files
    for ds in (memory, chunked):
        rows = pd.concat([ds.train.rows, ds.val.rows, ds.test.rows], ignore_index=True)
        across = rows["info_date"].isin(lasts[:-1]) & rows["target_date"].isin(firsts[1:])
        assert across.sum() > 100  # 6 boundaries, ~40 contracts a date
    rows = chunked.train.rows
    across = (rows["info_date"].isin(lasts[:-1]) & rows["target_date"].isin(firsts[1:])).to_numpy()
    persistence = chunked.train.persistence[across]
    assert np.isfinite(persistence).mean() > 0.9  # quoted the day before: persistence, not a fallback
    np.testing.assert_allclose(chunked.train.x_num.numpy()[across], memory.train.x_num.numpy()[across],
                               rtol=1e-6, atol=1e-6)


def test_train_stats_of_parts_equal_those_of_the_frame():
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(3.0, 2.0, size=(1000, 3)), columns=["a", "b", "c"]).assign(iv=0.2, base=0.19,
                                                                                         persistence=0.19)
    stats = D.TrainStats(["a", "b", "c"], [], "change")
    for a, b in [(0, 1), (1, 250), (250, 700), (700, 1000)]:  # a part of one row too
        stats.add(df.iloc[a:b])
    mean, std, square = stats.moments()
    np.testing.assert_allclose(mean, df[["a", "b", "c"]].mean(), rtol=1e-13)
    np.testing.assert_allclose(std, df[["a", "b", "c"]].std(), rtol=1e-13)
    np.testing.assert_allclose(square, (df[["a", "b", "c"]] ** 2).mean(), rtol=1e-13)


def test_files_out_of_date_order_are_an_error(tmp_path):
    raw = generate_chain(**SMALL)
    dates = np.sort(raw["quote_date"].unique())
    raw[raw["quote_date"] >= dates[20]].to_parquet(tmp_path / "a.parquet", index=False)  # later dates first
    raw[raw["quote_date"] < dates[20]].to_parquet(tmp_path / "b.parquet", index=False)
    with pytest.raises(ValueError, match="quote dates out of order across chunks.*one file per date or year"):
        C.load(path=str(tmp_path / "*.parquet"), chunk_rows=1, cache_dir=str(tmp_path / "cache"), horizon=0,
               **OPTIONS)
