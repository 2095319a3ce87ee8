"""The loader's worst cases, each a reproducer: a named error (the rule, the rows, the fix) or drops counted."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.fuzz import clean_chain, load_options
from vforge.data import chain as C


def load(df: pd.DataFrame | None, tmp_path, name: str = "chain.csv", **options):
    path = tmp_path / name
    if df is not None:
        df.to_parquet(path, index=False) if name.endswith(".parquet") else df.to_csv(path, index=False)
    return C.load(**load_options(str(path), **options))


def error(df, tmp_path, name: str = "chain.csv", **options) -> str:
    with pytest.raises(ValueError) as info:
        load(df, tmp_path, name, **options)
    return str(info.value)


def test_some_ivs_in_percent_in_a_decimal_file_are_refused_row_by_row(tmp_path):
    df = clean_chain()
    df.loc[:99, "implied_volatility"] *= 100  # the median still looks decimal
    msg = error(df, tmp_path)
    assert "iv outside the plausible range 0.005..5" in msg and "100 row(s), e.g. rows [0, 1, 2, 3, 4]" in msg
    assert "100 of them look like percent" in msg and "data.iv_unit=percent" in msg


def test_some_ivs_in_decimal_in_a_percent_file_are_refused(tmp_path):
    df = clean_chain().assign(implied_volatility=lambda d: d["implied_volatility"] * 100)
    df.loc[10:14, "implied_volatility"] /= 100
    msg = error(df, tmp_path, iv_unit="percent")
    assert "5 row(s), e.g. rows [10, 11, 12, 13, 14]" in msg and "5 of them look like decimal" in msg


def test_a_percent_file_declared_so_loads_the_same_ivs(tmp_path):
    clean = load(clean_chain(), tmp_path)
    pct = load(clean_chain().assign(implied_volatility=lambda d: d["implied_volatility"] * 100), tmp_path,
               "pct.csv", iv_unit="percent")
    np.testing.assert_allclose(pct.train.iv, clean.train.iv, rtol=1e-12)


def test_two_digit_years_are_refused_unless_the_format_is_given(tmp_path):
    df = clean_chain()
    for col in ("quote_date", "expiry"):
        df[col] = pd.to_datetime(df[col]).dt.strftime("%y-%m-%d")  # 2024-03-01 -> "24-03-01"
    msg = error(df, tmp_path)
    assert "quote_date: two-digit years are ambiguous" in msg and "'24-03-01'" in msg
    assert "'%y-%m-%d' or '%d-%m-%y'" in msg and "data.date_format" in msg
    ds = load(df, tmp_path, date_format="%y-%m-%d")
    assert str(ds.report["first_date"]) == "2024-03-01"


def test_a_two_digit_year_that_only_one_order_reads_is_parsed(tmp_path):
    df = clean_chain()
    df["expiry"] = pd.to_datetime(df["expiry"]).dt.strftime("%m/%d/%y")  # 04/19/24: only month/day/year fits
    ds = load(df, tmp_path)
    assert set(pd.to_datetime(ds.train.rows["expiry"]).dt.year) == {2024}


def test_day_first_and_month_first_mixed_in_one_column_is_refused(tmp_path):
    df = clean_chain()
    df["quote_date"] = pd.to_datetime(df["quote_date"]).dt.strftime("%d/%m/%Y")
    late = pd.to_datetime(clean_chain()["quote_date"]) >= "2024-03-14"  # 03/14/2024 cannot be day-first
    df.loc[late, "quote_date"] = pd.to_datetime(clean_chain()["quote_date"][late]).dt.strftime("%m/%d/%Y")
    msg = error(df, tmp_path)
    assert "day-first and month-first dates in one column" in msg


def test_time_zone_suffixes_on_some_rows_parse_to_the_same_dates(tmp_path):
    df = clean_chain()
    df.loc[::3, "quote_date"] = df.loc[::3, "quote_date"] + "T00:00:00+00:00"
    df.loc[1::3, "quote_date"] = df.loc[1::3, "quote_date"] + " 16:00:00-05:00"
    a, b = load(df, tmp_path), load(clean_chain(), tmp_path, "clean.csv")
    pd.testing.assert_frame_equal(a.test.rows, b.test.rows)


@pytest.mark.parametrize("name", ["chain.csv", "chain.parquet"])
def test_empty_and_header_only_files_name_the_file_and_data_path(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    msg = error(None, tmp_path, name)
    assert f"data.path='{tmp_path / name}'" in msg and str(tmp_path / name) in msg.split(":", 1)[1]
    msg = error(clean_chain().iloc[:0], tmp_path, name)
    assert "no data rows in " + name in msg and "header only" in msg


def test_an_empty_file_in_a_glob_is_named(tmp_path):
    df = clean_chain()
    df.iloc[:200].to_csv(tmp_path / "a.csv", index=False)
    (tmp_path / "b.csv").write_bytes(b"")
    msg = error(None, tmp_path, "*.csv")
    assert "b.csv is empty" in msg and "data.path=" in msg


@pytest.mark.parametrize(("column", "value", "rule"), [
    ("implied_volatility", 1e300, "iv outside the plausible range"),
    ("implied_volatility", 1e-12, "iv outside the plausible range"),
    ("strike", 1e-300, "moneyness outside the plausible range 0.01..20"),
    ("underlying_price", np.inf, "moneyness outside the plausible range"),
    ("rate", 3.0, "rate outside the plausible range -0.1..1"),
    ("dividend_yield", -2.0, "dividend_yield outside the plausible range"),
])
def test_absurd_magnitudes_are_refused_naming_the_rows(tmp_path, column, value, rule):
    df = clean_chain()
    df.loc[[5, 9], column] = value
    msg = error(df, tmp_path)
    assert rule in msg and "2 row(s), e.g. rows [5, 9]" in msg
    assert f"data.plausible.{rule.split()[0]}=" in msg and "data.implausible=drop" in msg
    ds = load(df, tmp_path, "drop.csv", implausible="drop")  # the override: dropped and counted
    assert ds.report["dropped"]["drop_implausible"] == 2


def test_a_rate_column_in_percent_says_so_and_loads_with_rate_unit(tmp_path):
    df = clean_chain().assign(rate=2.0)
    msg = error(df, tmp_path)
    assert "384 of them look like percent" in msg and "data.rate_unit=percent" in msg
    assert len(load(df, tmp_path, "pct.csv", rate_unit="percent").train) == len(load(clean_chain(), tmp_path).train)


def test_missing_strike_or_spot_is_dropped_under_its_own_reason(tmp_path):
    df = clean_chain()
    df.loc[[3, 4], "strike"] = np.nan
    df.loc[[7], "underlying_price"] = np.nan
    ds = load(df, tmp_path)
    assert ds.report["dropped"]["drop_missing_terms"] == 3
    assert ds.report["loaded"] == ds.report["rows"] + sum(ds.report["dropped"].values())


def test_a_rename_onto_an_existing_column_is_refused(tmp_path):
    df = clean_chain().assign(strike_price=lambda d: d["strike"])
    msg = error(df, tmp_path, columns={"strike": "strike_price"})
    assert "data.columns.strike='strike_price' renames 'strike_price' to 'strike'" in msg
    assert "already has a 'strike' column" in msg
    msg = error(clean_chain().assign(b=1.0), tmp_path, columns={"bid": "b", "ask": "b"})
    assert "both map column 'b'" in msg


def test_one_quote_date_says_one_and_what_is_needed(tmp_path):
    df = clean_chain()
    msg = error(df[df["quote_date"] == df["quote_date"].iloc[0]], tmp_path)
    assert "holds quotes of 1 quote date (2024-03-01)" in msg and "lower the fractions" not in msg


def test_a_bad_start_date_is_named(tmp_path):
    assert "data.start_date='03/2024' is not a date" in error(clean_chain(), tmp_path, start_date="03/2024")
