"""Your own option chains (CSV or Parquet) through the canonical contract of DESIGN.md.

``load`` reads one file (or a glob of files), renames columns through ``data.columns``, checks
every rule of the contract and stops with an error that names the rule, the column and up to five
offending rows; rows that are merely unusable (zero bid, price outside the no-arbitrage bounds,
IV not invertible, too wide a spread) are dropped and counted by reason in the data report.
"""

from __future__ import annotations

import functools
import glob as globlib
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vforge.data import dataset as D
from vforge.data.dataset import iv_drop_key
from vforge.data.iv import bs_vega, implied_vol

# Drops made by the pipeline after loading (dataset.build_rows / prepare): not quotes lost at load.
PIPELINE_DROPS = tuple(D.PIPELINE_DROPS)
REQUIRED = ["quote_date", "expiry", "strike", "option_type"]
OPTION_TYPES = {"c": "C", "call": "C", "calls": "C", "p": "P", "put": "P", "puts": "P"}
FORWARDS = ("spot", "column", "parity")
IV_RANGE = {"decimal": (0.0, 5.0), "percent": (0.5, 500.0)}  # plausible medians
UNITS = {"decimal": 1.0, "percent": 0.01}
# Values outside these ranges (decimal units; moneyness is strike / spot, or strike / forward) are an error
# naming the rows, or with data.implausible=drop dropped and counted; data.plausible.<name>=[lo,hi] widens one.
PLAUSIBLE = {"iv": (0.005, 5.0), "moneyness": (0.01, 20.0), "rate": (-0.1, 1.0), "dividend_yield": (-0.1, 1.0)}
# Columns that travel with the quotes inside ``normalize`` (file, time to expiry, price to invert, ...), not returned.
INTERNAL = ["_file", "_iv_given", "_tau", "_price", "_need_iv", "_inv_reason", "_width"]
# name -> how an error tells the user to supply that canonical column. Default (training): map one with
# ``data.columns.<name>=...``; an entry point whose columns are fixed by the run passes its own (predict).
ColumnHint = Callable[[str], str]


def table_files(path: str | Path, path_option: str = "data.path") -> list[str]:
    """The file ``path`` names, or every file its glob pattern matches, in name order (``path_option``: the
    option that names it in errors)."""
    path = str(path)
    files = sorted(globlib.glob(path)) if any(ch in path for ch in "*?[") else [path]
    if not files or not Path(files[0]).exists():
        raise FileNotFoundError(
            f"{path_option}={path!r} matches no file (relative paths start at {Path.cwd()}); "
            f"set {path_option}=<file.csv|file.parquet|glob>"
        )
    return files


def read_table(path: str | Path, *, read_options: dict | None = None,
               quote_date_from_path: str | None = None, path_option: str = "data.path") -> pd.DataFrame:
    """One CSV/Parquet file, or every file matching a glob pattern (concatenated, a ``_file`` column added).

    ``quote_date_from_path``: a regex whose first group is the file's quote date (one date a file).
    ``path_option``: the option that names the file in errors (``input`` for predict).
    """
    files = table_files(path, path_option)
    table = pd.concat([read_file(f, str(path), read_options, quote_date_from_path, path_option) for f in files],
                      ignore_index=True)
    if table.empty:
        _no_rows(str(path), files, path_option)
    return table


def read_chunks(path: str | Path, *, chunk_rows: int, read_options: dict | None = None,
                quote_date_from_path: str | None = None, path_option: str = "data.path") -> Iterator[pd.DataFrame]:
    """``read_table`` a chunk at a time: whole files in name order, concatenated until a chunk holds at least
    ``chunk_rows`` rows (so a file per date or per year is read once, and one chunk is in memory at a time)."""
    files, frames, n, total = table_files(path, path_option), [], 0, 0
    for f in files:
        frames.append(read_file(f, str(path), read_options, quote_date_from_path, path_option))
        n += len(frames[-1])
        if n >= chunk_rows:
            yield pd.concat(frames, ignore_index=True)
            frames, total, n = [], total + n, 0
    if frames and n:
        yield pd.concat(frames, ignore_index=True)
    elif not total:
        _no_rows(str(path), files, path_option)


def _no_rows(path: str, files: list[str], path_option: str) -> None:
    names = ", ".join(Path(f).name for f in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    raise ValueError(f"{path_option}={path!r}: no data rows in {names} (header only); "
                     f"point {path_option} at a file with quotes")


def read_file(file: str, path: str, read_options: dict | None, quote_date_from_path: str | None,
              path_option: str = "data.path") -> pd.DataFrame:
    """One file of ``path`` with a ``_file`` column (and its quote date, with ``quote_date_from_path``)."""
    df = _read_one(file, path, read_options, path_option)
    df = df.loc[:, [c for c in df.columns if not str(c).startswith("Unnamed")]]
    df["_file"] = Path(file).name
    if quote_date_from_path:
        m = re.search(quote_date_from_path, Path(file).name)
        if not m:
            raise ValueError(f"data.quote_date_from_path={quote_date_from_path!r} does not match file name "
                             f"{Path(file).name!r}; give a regex whose first group is the date")
        df["quote_date"] = m.group(1)
    return df


def _read_one(file: str, path: str, read_options: dict | None, path_option: str) -> pd.DataFrame:
    """One file, or an error naming it and ``path_option`` (pandas' and pyarrow's own do neither)."""
    try:
        if Path(file).suffix in (".parquet", ".pq"):
            return pd.read_parquet(file)
        return pd.read_csv(file, **(read_options or {}))
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path_option}={path!r}: {file} is empty (no header, no rows)") from None
    except (ValueError, TypeError, OSError, UnicodeDecodeError, pd.errors.ParserError) as e:
        # pyarrow.ArrowInvalid is a ValueError; a bad encoding or a torn line a UnicodeDecodeError / ParserError
        kind = "Parquet" if Path(file).suffix in (".parquet", ".pq") else "CSV"
        hint = " (set data.read_options, e.g. {encoding: gbk})" if isinstance(e, UnicodeDecodeError) else ""
        raise ValueError(f"{path_option}={path!r}: cannot read {file} as {kind}{hint}: "
                         f"{type(e).__name__}: {str(e)[:300]}") from None


def _rows(mask: Any, df: pd.DataFrame | None = None) -> str:
    idx = np.flatnonzero(np.asarray(mask))
    where = ""
    if df is not None and "_file" in df.columns and df["_file"].nunique() > 1:
        where = " in " + ", ".join(sorted(set(df["_file"].iloc[idx[:5]])))
    return f"{len(idx)} row(s), e.g. rows {idx[:5].tolist()}{where} (0-based, header excluded)"


def _show(value: Any) -> str:
    return str(value.date()) if isinstance(value, pd.Timestamp) else f"{value:g}" if isinstance(value, float) else str(value)


# A time followed by a UTC offset or zone name: "2024-01-02T16:00:00+00:00", "... 16:00 UTC", "...Z".
_TZ_SUFFIX = r"(?<=\d\d:\d\d)(?::\d\d(?:\.\d+)?)?\s*(?:Z|UTC|GMT|[+-]\d\d:?\d\d)$"
_DAY_MONTH_YEAR = r"^(\d{1,2})[/.-](\d{1,2})[/.-]\d{4}\b"


def _date_strings(values: pd.Series) -> pd.Series:
    """Date cells as stripped strings; a time zone suffix is dropped, so each date is its own wall-clock date
    (pandas refuses a column that mixes zones, or zone-less and zoned values)."""
    text = values.astype(str).str.strip().str.replace(r"\.0$", "", regex=True)
    return text.str.replace(_TZ_SUFFIX, "", regex=True).where(values.notna())


def _two_digit_years(text: pd.Series, col: str, df: pd.DataFrame) -> pd.Series | None:
    """Dates with a two-digit year, parsed in the one day/month/year order that reads them all; an error when
    several orders would ("24-01-02": 2024-01-02 or 2002-01-24) or none does. None when there are none."""
    fix = "set data.date_format (e.g. data.date_format='%d/%m/%y' or '%y-%m-%d'; Python strftime codes)"
    rows = lambda mask: _rows(mask.reindex(df.index, fill_value=False), df)  # noqa: E731 - positions in the table
    groups = text.fillna("").str.findall(r"\d+")
    short = groups.map(lambda g: len(g) >= 2 and max(map(len, g)) < 4) | text.fillna("").str.fullmatch(r"\d{6}")
    if not short.any():
        return None
    values = text[short]
    sep = values.str.extract(r"^\d{1,2}([/.-])\d{1,2}\1\d{1,2}$")[0]
    if sep.isna().any() or sep.nunique() > 1:
        if not values.str.fullmatch(r"\d{6}").all():
            raise ValueError(f"{col}: dates with a two-digit year in {rows(short)}, values "
                             f"{values.head(3).tolist()}: the order of day, month and year is not certain. To fix: {fix}")
        sep = pd.Series([""])
    sep = sep.iloc[0]
    readings = {}
    for order in (("%y", "%m", "%d"), ("%d", "%m", "%y"), ("%m", "%d", "%y")):
        fmt = sep.join(order)
        parsed = pd.to_datetime(values, format=fmt, errors="coerce")
        if parsed.notna().all():
            readings[fmt] = parsed
    if len(readings) != 1:
        what = (f"could be read as {' or '.join(repr(f) for f in readings)}" if readings
                else "fit no day/month/year order")
        raise ValueError(f"{col}: two-digit years are ambiguous: {values.iloc[0]!r} ... {what} "
                         f"({rows(short)}, values {values.head(3).tolist()}). To fix: {fix}")
    return next(iter(readings.values()))


def _day_first(text: pd.Series, col: str, df: pd.DataFrame) -> bool:
    """Whether ``d/m/yyyy`` dates are day-first; an error for a column that mixes day-first and month-first."""
    parts = text.str.extract(_DAY_MONTH_YEAR).astype(float)
    day_first, month_first = parts[0] > 12, parts[1] > 12
    if day_first.any() and month_first.any():
        mask = (day_first | month_first).reindex(df.index, fill_value=False)
        raise ValueError(f"{col}: day-first and month-first dates in one column, e.g. {text[day_first].iloc[0]!r} "
                         f"and {text[month_first].iloc[0]!r} ({_rows(mask, df)}). To fix: write one format, or set "
                         "data.date_format (e.g. data.date_format='%d/%m/%Y'; Python strftime codes)")
    return bool(day_first.any())


def _bound(value: str | None, name: str, default: str) -> pd.Timestamp:
    """``data.start_date`` / ``data.end_date`` as a date (a time zone suffix is dropped, as in the columns)."""
    parsed = pd.to_datetime(_date_strings(pd.Series([str(value or default)])), errors="coerce", format="ISO8601")[0]
    if pd.isna(parsed):
        raise ValueError(f"data.{name}={value!r} is not a date; write it as YYYY-MM-DD")
    return parsed.normalize()


def parse_dates(df: pd.DataFrame, col: str, date_format: str | None = None,
                column_hint: ColumnHint | None = None) -> pd.Series:
    """Dates per source file (files may use different formats); unparseable or ambiguous ones are an error.

    ``date_format``: a strftime format every value of the column must follow (``data.date_format``).
    ``column_hint``: how errors say to use another column (see ``ColumnHint``).
    """
    raw = df[col]
    files = df["_file"].to_numpy()
    if not len(df) or (files == files[0]).all():  # one file: no grouping, no reassembling
        out = _file_dates(raw, col, date_format, df)
    else:
        out = pd.Series(pd.NaT, index=df.index, dtype="datetime64[ns]")
        for _, idx in df.groupby("_file", sort=False).groups.items():
            out.loc[idx] = _file_dates(raw.loc[idx], col, date_format, df)
    missing = raw.isna().to_numpy()
    bad = np.isnat(out.to_numpy()) & ~missing | missing
    if bad.any():
        example = raw[bad].head(3).tolist()
        how = f" with data.date_format={date_format!r}" if date_format else ""
        other = column_hint(col) if column_hint else f"map another column with data.columns.{col}=<your column>"
        raise ValueError(f"{col}: unparseable{how} or missing dates in {_rows(bad, df)}, values {example}. "
                         f"Fix the column, set data.date_format, or {other}")
    if not (out.to_numpy().view(np.int64) % _NS_PER_DAY).any():  # dates at midnight already (no NaT is left)
        return out
    return out.dt.normalize()


_NS_PER_DAY = 86_400 * 10**9


def _file_dates(values: pd.Series, col: str, date_format: str | None, df: pd.DataFrame) -> pd.Series:
    """One file's date cells parsed (``parse_dates``), as naive ``datetime64[ns]``; NaT where unparseable. Each
    distinct cell is read once: every rule the reading follows (two-digit years, day-first, the format inferred from
    the first value) depends on which values the file holds, not on how often, so the distinct values in order of
    first appearance read as the whole column does; a reading that raises is redone on the whole column, whose error
    names the rows."""
    if not pd.api.types.is_datetime64_any_dtype(values):
        codes, distinct = pd.factorize(values)  # missing cells: code -1
        if len(distinct) < len(values):
            try:
                read = _distinct_dates(tuple(distinct), str(distinct.dtype), col, date_format)
            except (ValueError, TypeError):  # TypeError: a cell that is no dictionary key
                pass
            else:
                return pd.Series(np.where(codes >= 0, read[codes], np.datetime64("NaT", "ns")), index=values.index,
                                 dtype="datetime64[ns]")
    return _read_dates(values, col, date_format, df)


@functools.lru_cache(maxsize=64)
def _distinct_dates(distinct: tuple, dtype: str, col: str, date_format: str | None) -> np.ndarray:
    """``_read_dates`` of a file's distinct date cells (in order of first appearance), remembered: a service reads
    the same few quote dates and expiries request after request. Read-only."""
    read = _read_dates(pd.Series(distinct, dtype=dtype), col, date_format, pd.DataFrame(index=range(len(distinct))))
    out = read.to_numpy()
    out.flags.writeable = False
    return out


def _read_dates(values: pd.Series, col: str, date_format: str | None, df: pd.DataFrame) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = values
    elif date_format:
        parsed = pd.to_datetime(_date_strings(values), errors="coerce", format=date_format)
    else:
        values = _date_strings(values)
        short = _two_digit_years(values, col, df)
        day_first = _day_first(values, col, df)
        # ISO dates first, on their own: dayfirst would turn 2024-03-01 into January 3rd
        iso = values.str.match(r"^\d{4}-\d{1,2}-\d{1,2}").fillna(False).astype(bool)
        parsed = pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns]")
        parsed[iso] = pd.to_datetime(values[iso], errors="coerce", format="ISO8601")
        if short is not None:
            parsed[short.index] = short
            iso[short.index] = True  # done
        rest = values[~iso]
        with warnings.catch_warnings():  # "could not infer format": the mixed-format fallback below handles it
            warnings.simplefilter("ignore", UserWarning)
            for fmt in (None, "mixed"):  # one inferred format, then each value on its own
                todo = rest.index[parsed[rest.index].isna()]
                if len(todo):
                    try:
                        parsed[todo] = pd.to_datetime(rest[todo], errors="coerce", format=fmt, dayfirst=day_first)
                    except (ValueError, TypeError, OverflowError):
                        pass  # left NaT: reported below with the values
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_localize(None)
    return parsed.astype("datetime64[ns]")


def check_renames(raw: pd.DataFrame, columns: Mapping[str, str | None]) -> None:
    """``data.columns`` must map each canonical name to its own column, onto no column the table already has."""
    mapped = {k: v for k, v in columns.items() if v is not None and v != k}
    sources = set(mapped.values())
    for name, source in mapped.items():
        others = [k for k, v in mapped.items() if v == source and k != name]
        if others:
            raise ValueError(f"data.columns.{name} and data.columns.{others[0]} both map column {source!r}; "
                             "map each canonical name to its own column")
        if source in raw.columns and name in raw.columns and name not in sources:
            raise ValueError(
                f"data.columns.{name}={source!r} renames {source!r} to {name!r}, but the table already has a "
                f"{name!r} column; drop or rename one of them in the file, or use the table's own with "
                f"data.columns.{name}=null")


def plausible_ranges(plausible: dict | None) -> dict[str, tuple[float, float]]:
    """``data.plausible`` over the defaults (``PLAUSIBLE``)."""
    unknown = set(plausible or {}) - set(PLAUSIBLE)
    if unknown:
        raise ValueError(f"data.plausible has unknown key(s) {sorted(unknown)}; valid: {', '.join(PLAUSIBLE)}")
    ranges: dict[str, tuple[float, float]] = {}
    for k, v in PLAUSIBLE.items():
        lo, hi = (plausible or {}).get(k, v)
        ranges[k] = (float(lo), float(hi))
    for k, (lo, hi) in ranges.items():
        if not lo < hi:
            raise ValueError(f"data.plausible.{k} must be [low, high] with low < high, got {[lo, hi]}")
    return ranges


def implausible_rows(df: pd.DataFrame, *, units: dict[str, str], forward: str, plausible: dict | None,
                     implausible: str) -> np.ndarray:
    """Rows whose IV (as given), moneyness, rate or dividend yield lies outside ``data.plausible``.

    The IVs' median must fit the declared unit first (a whole column in the other unit); then each row is
    checked, so that a few rows in percent in a decimal file (or the reverse) cannot pass. ``implausible=error``
    raises with the rule, the rows and the fix; ``drop`` returns the mask to drop (counted as drop_implausible).
    """
    if implausible not in ("error", "drop"):
        raise ValueError(f"data.implausible must be 'error' or 'drop', got {implausible!r}")
    ranges = plausible_ranges(plausible)
    iv_unit = units["iv"]
    column = lambda name: df[name].to_numpy(np.float64)  # noqa: E731 - the checks run on arrays; errors show Series
    with np.errstate(invalid="ignore", divide="ignore"):
        if "implied_volatility" in df.columns:
            raw_iv = column("implied_volatility")
        elif {"iv_bid", "iv_ask"} <= set(df.columns):
            raw_iv = np.where(column("iv_bid") > 0, 0.5 * (column("iv_bid") + column("iv_ask")), np.nan)
        else:
            raw_iv = np.full(len(df), np.nan)
        given = raw_iv[raw_iv > 0]  # missing or zero: dropped later as drop_missing_iv
        if len(given):
            finite = given[np.isfinite(given)]
            med = float(np.median(finite)) if len(finite) else float("inf")
            lo, hi = IV_RANGE[iv_unit]
            if not lo <= med <= hi:
                other = "percent" if iv_unit == "decimal" else "decimal"
                raise ValueError(
                    f"data.iv_unit={iv_unit} but the implied volatilities look like {other}: median {med:.4g} "
                    f"(expected {lo:g}..{hi:g} for {iv_unit}). Set data.iv_unit={other}"
                )
        if forward == "spot":
            ratio = column("strike") / column("underlying_price")
        elif forward == "column":
            ratio = column("strike") / column("forward")
        else:  # parity: the forward comes from prices later; the strike must still be a finite number
            ratio = np.where(np.isfinite(column("strike")), 1.0, np.inf)
        checks = [  # name, values in decimal, column shown, the unit option, its unit
            ("iv", np.where(raw_iv > 0, raw_iv, np.nan) * UNITS[iv_unit], "implied_volatility", "data.iv_unit",
             iv_unit),
            ("moneyness", ratio, "strike / " + ("underlying_price" if forward == "spot" else "forward"), None, None),
            ("rate", column("rate"), "rate", "data.rate_unit", units["rate"]),
            ("dividend_yield", column("dividend_yield"), "dividend_yield", "data.dividend_unit",
             units["dividend_yield"]),
        ]
    drop = np.zeros(len(df), dtype=bool)
    for name, array, shown, unit_key, unit in checks:
        lo, hi = ranges[name]
        out = ~np.isnan(array) & ~((array >= lo) & (array <= hi))
        if not out.any():
            continue
        if implausible == "drop":
            drop |= out
            continue
        values = pd.Series(array, index=df.index)
        hint = ""
        if unit_key:
            other = "percent" if unit == "decimal" else "decimal"
            as_other = values[out] * (0.01 if unit == "decimal" else 100.0)
            n_other = int(as_other.between(lo, hi).sum())
            if n_other:
                hint = (f"; {n_other} of them look like {other} (a file must use one unit: correct them, or set "
                        f"{unit_key}={other} if the whole column is {other})")
        where = df.index[out][:3]
        shown_values = ", ".join(f"{shown}={values[i]:.4g}" for i in where)
        raise ValueError(
            f"{name} outside the plausible range {lo:g}..{hi:g} (decimal): {_rows(out, df)}: {shown_values}{hint}. "
            f"To fix: correct those rows, widen the range with data.plausible.{name}=[{lo:g},{hi:g}] (your bounds), "
            "or set data.implausible=drop to drop and count them")
    return drop


@dataclass(frozen=True)
class ChainOptions:
    """How to read a raw chain and which of its quotes to keep: the loader keys of ``conf/data/chain.yaml``.

    Quote filters are off at None/False: ``min_days`` calendar days to expiry, ``iv_range`` (lo, hi) plausible IVs,
    ``max_spread_vol`` the bid/ask spread in vol, ``max_iv_outside_quote`` how far (vol) a given IV may lie outside
    its own bid/ask band (``iv_outside_quote``), ``min_price``, ``otm_only``; ``itm_from_otm`` gives an in-the-money
    row its OTM counterpart's IV.
    """

    columns: Mapping[str, str | None] = field(default_factory=dict)
    iv_unit: str = "decimal"
    rate_unit: str = "decimal"
    dividend_unit: str = "decimal"
    date_format: str | None = None
    plausible: Mapping[str, Any] | None = None
    implausible: str = "error"
    forward: str = "spot"
    rate: float = 0.0
    dividend_yield: float = 0.0
    option_type: str | None = None
    duplicates: str = "error"
    start_date: str | None = None
    end_date: str | None = None
    min_days: int | None = None
    iv_range: tuple[float, float] | None = None
    max_spread_vol: float | None = None
    max_iv_outside_quote: float | None = None
    min_price: float | None = None
    otm_only: bool = False
    itm_from_otm: bool = False

    @classmethod
    def pick(cls, options: Mapping[str, Any]) -> tuple[ChainOptions, dict[str, Any]]:
        """The keys of ``options`` that are loader options, as ``ChainOptions``, and the rest."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names}), {
            k: v for k, v in options.items() if k not in names}


class Quotes:
    """One frame of quotes: ``drop(mask, reason)`` removes the rows of ``mask`` and counts them under ``reason``
    (``DROP_REASONS``) in the report's ``dropped``. Values that travel with the rows are columns of the frame."""

    def __init__(self, df: pd.DataFrame, dropped: dict[str, int]):
        self.df, self.dropped = df, dropped

    def drop(self, mask: Any, reason: str) -> None:
        mask = np.asarray(mask, dtype=bool)
        n = int(mask.sum())
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        index = self.df.index
        if n or not (isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1):
            self.df = self.df[~mask].reset_index(drop=True)


def _itm(df: pd.DataFrame) -> np.ndarray:
    return np.where(df["option_type"] == "C", df["strike"] < df["forward"], df["strike"] > df["forward"])


# Quote filters a quant applies before fitting anything: (reason, whether an option turns it on, the rows it drops),
# applied in this order once the IVs are known, each counted under its own reason.
QUOTE_FILTERS: list[tuple[str, Callable[[ChainOptions], bool], Callable[[pd.DataFrame, ChainOptions], Any]]] = [
    ("drop_short_expiry", lambda o: bool(o.min_days),
     lambda df, o: ((df["expiry"] - df["quote_date"]).dt.days < o.min_days).to_numpy()),
    ("drop_iv_range", lambda o: bool(o.iv_range),
     lambda df, o: ~df["implied_volatility"].between(*(o.iv_range or (0.0, np.inf))).to_numpy()),
    ("drop_wide_spread", lambda o: o.max_spread_vol is not None,
     lambda df, o: (df["_width"] > o.max_spread_vol).to_numpy()),
    ("drop_iv_outside_quote", lambda o: o.max_iv_outside_quote is not None,
     lambda df, o: iv_outside_quote(df, df["_tau"].to_numpy()) > o.max_iv_outside_quote),
    ("drop_in_the_money", lambda o: o.otm_only, lambda df, o: _itm(df)),
]


def normalize(raw: pd.DataFrame, options: ChainOptions | None = None, *, report: dict,
              column_hint: ColumnHint | None = None, **kwargs: Any) -> pd.DataFrame:
    """Rename, type and check a raw table; fill IV by inversion where it is missing; apply the quote filters.

    ``options`` (or its fields as keyword arguments) says how. Unusable rows are dropped and counted in
    ``report['dropped']`` by reason; impossible values raise ``ValueError`` naming the rule and the rows.
    ``column_hint``: how errors say to supply a missing column (see ``ColumnHint``).
    """
    o = options if options is not None else ChainOptions(**kwargs)
    df = canonical(raw, o, report, column_hint)
    q = Quotes(df, report.setdefault("dropped", {}))
    drop_unusable(q, o, report)
    fill_iv(q, o, report)
    for reason, enabled, rows in QUOTE_FILTERS:
        if enabled(o):
            q.drop(rows(q.df, o), reason)
    df = q.df
    if "time_to_expiry" in df.columns:
        df["time_to_expiry"] = df["_tau"]
    df = df.drop(columns=[c for c in INTERNAL if c in df.columns])
    df.columns = df.columns.astype("str")
    if df["option_type"].dtype == object:
        df["option_type"] = df["option_type"].astype("str")
    return df


def canonical(raw: pd.DataFrame, o: ChainOptions, report: dict, column_hint: ColumnHint | None = None
              ) -> pd.DataFrame:
    """The table in canonical names and types, every rule of the contract checked (an error names the rule, the
    column and the rows), rate and dividend yield in decimal (the defaults where missing)."""
    if o.iv_unit not in IV_RANGE:
        raise ValueError(f"data.iv_unit must be 'decimal' or 'percent', got {o.iv_unit!r}")
    if o.forward not in FORWARDS:
        raise ValueError(f"data.forward must be one of {', '.join(FORWARDS)}, got {o.forward!r}")
    columns = dict(o.columns)
    check_renames(raw, columns)
    df = raw.rename(columns={v: k for k, v in columns.items() if v is not None and v != k})
    # While the loader works, the column labels and its own text columns are Python objects: pandas 3's Arrow-backed
    # strings rebuild the labels at each column insert and cost ~0.1 ms a column at each row selection (``normalize``
    # gives back the canonical dtypes).
    df.columns = pd.Index(list(df.columns), dtype=object)
    if "_file" not in df.columns:
        df["_file"] = pd.Series("table", index=df.index, dtype=object)
    dropped = report.setdefault("dropped", {})
    report["loaded"] = report.get("loaded", 0) + len(df)

    need = [c for c in REQUIRED if not (c == "option_type" and o.option_type)]
    need += {"spot": ["underlying_price"], "column": ["forward"], "parity": []}[o.forward]
    missing = [c for c in need if c not in df.columns]
    if missing:
        hints = {"underlying_price": " (or data.forward=parity to take forwards from call/put pairs)",
                 "option_type": " (or data.option_type=otm when each row is the out-of-the-money side)"}
        raise ValueError(
            f"required column(s) {missing} not found; the table has {[c for c in raw.columns if c != '_file']}. "
            + (column_hint(missing[0]) if column_hint else
               f"Map yours with data.columns, e.g. data.columns.{missing[0]}=<your column name>")
            + hints.get(missing[0], "")
        )
    has_iv = "implied_volatility" in df.columns or {"iv_bid", "iv_ask"} <= set(df.columns)
    has_price = {"bid", "ask"} <= set(df.columns) or "price" in df.columns
    if not has_iv and not has_price:
        raise ValueError(
            f"no implied_volatility and no prices to invert it from; the table has "
            f"{[c for c in raw.columns if c != '_file']}. Map one with data.columns.implied_volatility=<column>, "
            "data.columns.bid=... and data.columns.ask=..., or data.columns.price=<column>"
        )

    df["quote_date"] = parse_dates(df, "quote_date", o.date_format, column_hint)
    df["expiry"] = parse_dates(df, "expiry", o.date_format, column_hint)
    if o.start_date or o.end_date:
        keep = df["quote_date"].between(_bound(o.start_date, "start_date", "1900-01-01"),
                                        _bound(o.end_date, "end_date", "2200-01-01"))
        dropped["drop_outside_dates"] = dropped.get("drop_outside_dates", 0) + int((~keep).sum())
        df = df[keep].reset_index(drop=True)
        if df.empty:
            raise ValueError(f"no quote dates between data.start_date={o.start_date} and data.end_date={o.end_date}")
    numeric = [c for c in ("strike", "underlying_price", "forward", "implied_volatility", "iv_bid", "iv_ask", "bid",
                           "ask", "price", "rate", "dividend_yield", "time_to_expiry") if c in df.columns]
    for col in numeric:
        if df[col].dtype == np.float64:  # numbers already: nothing to parse or check
            continue
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() & df[col].notna()
        if bad.any():  # blank cells are missing values, not errors
            bad &= df[col].astype(str).str.strip() != ""
        if bad.any():
            raise ValueError(f"{col}: non-numeric values in {_rows(bad, df)}, values {df.loc[bad, col].head(3).tolist()}")
        df[col] = values.astype(np.float64)

    if o.option_type:
        if "option_type" in df.columns:
            raise ValueError(f"data.option_type={o.option_type!r} but the table has an option_type column; "
                             "set data.option_type=null")
        if o.option_type not in ("otm", "C", "P"):
            raise ValueError(f"data.option_type must be null, 'otm', 'C' or 'P', got {o.option_type!r}")
    else:
        # each distinct spelling read once (a chain has a handful), every row then takes its spelling's reading
        given = df["option_type"]
        codes, spellings = pd.factorize(given, use_na_sentinel=False)
        read, dtype = _option_types(tuple(spellings), str(spellings.dtype))
        df["option_type"] = pd.Series(read[codes], index=df.index, dtype=object)
        bad = df["option_type"].isna()
        if bad.any():
            spelled = given.astype(str).str.strip().str.lower()
            spellings = sorted({"<missing>" if v != v else str(v) for v in spelled[bad]})[:5]  # NaN != NaN
            raise ValueError(f"option_type: unknown spellings {spellings} in {_rows(bad, df)}; "
                             f"accepted: {', '.join(OPTION_TYPES)} (any case)")
    check_rules(df)

    units = {"rate": o.rate_unit, "dividend_yield": o.dividend_unit}
    for col, default in (("rate", o.rate), ("dividend_yield", o.dividend_yield)):
        if col not in df.columns:
            df[col] = float(default)
            report.setdefault("assumed", {})[col] = f"{float(default):g} used (data.{col}): the table has no {col} column"
        else:
            if units[col] not in UNITS:
                raise ValueError(f"data.{'rate' if col == 'rate' else 'dividend'}_unit must be 'decimal' or "
                                 f"'percent', got {units[col]!r}")
            if UNITS[units[col]] != 1.0:
                df[col] = df[col] * UNITS[units[col]]
            missing = df[col].isna()
            if missing.any():
                report.setdefault("assumed", {})[col] = (f"{float(default):g} used (data.{col}) on "
                                                         f"{int(missing.sum()):,} rows where {col} is missing")
                df[col] = df[col].fillna(float(default))
    return df


@functools.lru_cache(maxsize=64)
def _option_types(spellings: tuple, dtype: str) -> tuple[np.ndarray, Any]:
    """The canonical option type of each distinct spelling (missing where unknown) and the column's dtype,
    remembered: a service reads the same few spellings request after request. Read-only."""
    read = pd.Series(spellings, dtype=dtype).astype(str).str.strip().str.lower().map(OPTION_TYPES)
    out = read.to_numpy()
    out.flags.writeable = False
    return out, read.dtype


def check_rules(df: pd.DataFrame) -> None:
    """Impossible values are errors, never silent drops: the rule, the offending rows and how to fix it."""
    mapping = "check data.columns.{} points at the right column"
    a = {c: df[c].to_numpy() for c in ("strike", "expiry", "quote_date", "bid", "ask", "price", "underlying_price",
                                       "forward", "iv_bid", "iv_ask") if c in df.columns}  # masks on arrays
    rules = [
        ("strike must be > 0", a["strike"] <= 0, ["strike"], mapping.format("strike")),
        ("expiry must not be before quote_date", a["expiry"] < a["quote_date"], ["quote_date", "expiry"],
         "check data.columns.expiry and data.columns.quote_date, and that the dates parse as intended "
         "(e.g. day-first vs month-first); remove rows of expired contracts"),
    ]
    for col in ("bid", "ask", "price"):
        if col in a:
            rules.append((f"{col} must be >= 0", a[col] < 0, [col], mapping.format(col)))
    for col in ("underlying_price", "forward"):
        if col in a:
            rules.append((f"{col} must be > 0", a[col] <= 0, [col], mapping.format(col)))
    if {"bid", "ask"} <= set(a):
        rules.append(("bid must not exceed ask (crossed quote)", a["bid"] > a["ask"], ["bid", "ask"],
                      "check that data.columns.bid and data.columns.ask are not swapped; remove crossed quotes"))
    if {"iv_bid", "iv_ask"} <= set(a):
        rules.append(("iv_bid must not exceed iv_ask (crossed quote)", a["iv_bid"] > a["iv_ask"], ["iv_bid", "iv_ask"],
                      "check that data.columns.iv_bid and data.columns.iv_ask are not swapped"))
    for rule, bad, cols, fix in rules:
        if bad.any():
            shown = "; ".join(", ".join(f"{c}={_show(df.at[i, c])}" for c in cols) for i in df.index[bad][:3])
            raise ValueError(f"{rule}: violated by {_rows(bad, df)}: {shown}. To fix: {fix}")


def drop_unusable(q: Quotes, o: ChainOptions, report: dict) -> None:
    """Drop (and count) quotes without terms, outside ``data.plausible``, duplicated or expired; the IV as given
    (in decimal), the time to expiry (``_tau``) and the price to invert from (``_price``) become columns."""
    df = q.df
    missing_terms = df["strike"].isna()
    for col in ("underlying_price", "forward"):
        if col in df.columns and (o.forward == "spot") == (col == "underlying_price") and o.forward != "parity":
            missing_terms |= df[col].isna()
    q.drop(missing_terms, "drop_missing_terms")
    units = {"iv": o.iv_unit, "rate": o.rate_unit, "dividend_yield": o.dividend_unit}
    q.drop(implausible_rows(q.df, units=units, forward=o.forward, plausible=dict(o.plausible or {}) or None,
                            implausible=o.implausible), "drop_implausible")

    df = q.df
    key = ["quote_date", "expiry", "strike"] + ([] if o.option_type else ["option_type"])
    dup = df.duplicated(key, keep=False)
    if dup.any():
        if o.duplicates == "error":
            raise ValueError(f"duplicate contracts (same {', '.join(key)}) in {_rows(dup, df)}. "
                             "Set data.duplicates=drop to drop every copy, or first to keep the first")
        q.drop(dup if o.duplicates == "drop" else df.duplicated(key, keep="first"), "drop_duplicate")
    q.drop(q.df["expiry"] == q.df["quote_date"], "drop_expired")

    df = q.df
    if "time_to_expiry" in df.columns:
        df["_tau"] = df["time_to_expiry"].to_numpy()
    else:
        df["_tau"] = D.calendar_days(df["expiry"], df["quote_date"]) / 365.0
    # Implied volatility given (its unit was checked against the values in implausible_rows).
    if "implied_volatility" not in df.columns:
        df["implied_volatility"] = np.nan
        if {"iv_bid", "iv_ask"} <= set(df.columns):
            zero_bid = df["iv_bid"].isna() | (df["iv_bid"] <= 0)
            df["implied_volatility"] = (0.5 * (df["iv_bid"] + df["iv_ask"])).where(~zero_bid)
            q.drop(zero_bid, "drop_zero_bid")
            df = q.df
    scale = UNITS[o.iv_unit]
    for col in ("implied_volatility", "iv_bid", "iv_ask"):
        if col in df.columns and scale != 1.0:
            df[col] = df[col] * scale
    # Price to invert from where IV is absent: the bid/ask mid, else a price (e.g. a close).
    if {"bid", "ask"} <= set(df.columns):
        df["_price"] = 0.5 * (df["bid"] + df["ask"])
    elif "price" in df.columns:
        df["_price"] = df["price"]
    iv = df["implied_volatility"].to_numpy(np.float64)
    df["_need_iv"] = np.isnan(iv) | (iv <= 0)
    df["_iv_given"] = ~df["_need_iv"].to_numpy()
    if "_price" in df.columns:
        column = lambda name: q.df[name].to_numpy()  # noqa: E731 - of the rows left
        if "bid" in df.columns:
            q.drop(column("_need_iv") & ((column("bid") <= 0) | np.isnan(column("bid"))), "drop_zero_bid")
        q.drop(column("_need_iv") & np.isnan(column("_price")), "drop_missing_price")
        if o.min_price:
            q.drop(column("_need_iv") & (column("_price") < o.min_price), "drop_min_price")


def fill_iv(q: Quotes, o: ChainOptions, report: dict) -> None:
    """Forwards (spot carried, a column, or put-call parity), IVs inverted where missing (failures dropped and
    counted by the inverter's reason), ITM IVs from their OTM counterparts, and the spread in vol (``_width``)."""
    df = q.df
    has_price = "_price" in df.columns
    tau = df["_tau"].to_numpy()
    carry = np.exp((df["rate"] - df["dividend_yield"]).to_numpy() * tau)
    if o.forward == "spot":
        df["forward"] = df["underlying_price"].to_numpy() * carry
    elif o.forward == "parity":
        if not has_price:
            raise ValueError("data.forward=parity needs prices (bid/ask or price) of calls and puts")
        df["forward"] = parity_forward(df, df["_price"], tau)
        q.drop(df["forward"].isna(), "drop_no_parity_forward")
        df = q.df
        tau = df["_tau"].to_numpy()
    if "underlying_price" not in df.columns:
        df["underlying_price"] = df["forward"] / np.exp((df["rate"] - df["dividend_yield"]).to_numpy() * tau)
    if o.option_type:
        df["option_type"] = (np.where(df["strike"] >= df["forward"], "C", "P") if o.option_type == "otm"
                             else o.option_type)

    need_iv = df["_need_iv"].to_numpy()
    inverted = bool(need_iv.any()) and has_price  # without prices, missing IVs stay missing (or take their OTM's)
    if inverted:
        m = need_iv
        column = lambda name: df[name].to_numpy()[m]  # noqa: E731
        sigma, reason = implied_vol(column("_price"), column("forward"), column("strike"), tau[m], column("rate"),
                                    column("option_type") == "C")
        iv = df["implied_volatility"].to_numpy(np.float64, copy=True)
        iv[m] = sigma
        df["implied_volatility"] = iv
        inv_reason = np.zeros(len(df), dtype=np.int8)
        inv_reason[m] = reason
        df["_inv_reason"] = inv_reason
    df["_width"] = spread_vol(df, tau)
    if o.itm_from_otm:
        # The IV of a strike is its out-of-the-money quote's: an ITM row takes it (and its spread)
        # where the OTM counterpart exists; deep ITM quotes carry little information about volatility.
        key = ["quote_date", "expiry", "strike"]
        itm = _itm(df)
        otm = df.loc[~itm, key].assign(_iv=df.loc[~itm, "implied_volatility"], _w=df["_width"][~itm])
        otm = otm[np.isfinite(otm["_iv"]) & (otm["_iv"] > 0)].drop_duplicates(key)
        counterpart = df[key].merge(otm, on=key, how="left")
        take = itm & counterpart["_iv"].notna().to_numpy()
        df.loc[take, "implied_volatility"] = counterpart.loc[take, "_iv"].to_numpy()
        df.loc[take, "_iv_given"] = False
        df["_width"] = df["_width"].where(~take, counterpart["_w"])
        report["itm_iv_from_otm"] = report.get("itm_iv_from_otm", 0) + int(take.sum())

    # Every row without a usable IV is dropped once, counted under why: the inverter's reason, an absurd inverted
    # IV (a stale or torn price: data.plausible.iv), or no IV at all.
    dropped = q.dropped
    iv = df["implied_volatility"].to_numpy(np.float64)
    bad_iv = ~(np.isfinite(iv) & (iv > 0))
    if inverted:
        failed = df["_inv_reason"].to_numpy()[bad_iv]
        for code, count in zip(*np.unique(failed[failed != 0], return_counts=True)):
            dropped[iv_drop_key(int(code))] = dropped.get(iv_drop_key(int(code)), 0) + int(count)
        unexplained = int((failed == 0).sum())  # e.g. a NaN price: no inversion reason, still counted
        if unexplained:
            dropped["drop_missing_iv"] = dropped.get("drop_missing_iv", 0) + unexplained
        lo, hi = plausible_ranges(dict(o.plausible or {}) or None)["iv"]
        absurd = need_iv & ~bad_iv & ~((iv >= lo) & (iv <= hi))
        dropped["drop_iv_implausible"] = dropped.get("drop_iv_implausible", 0) + int(absurd.sum())
        bad_iv = bad_iv | absurd
    if bad_iv.any():
        unexplained_rows = bad_iv if not has_price else bad_iv & ~need_iv
        dropped["drop_missing_iv"] = dropped.get("drop_missing_iv", 0) + int(unexplained_rows.sum())
    q.df = df[~bad_iv].reset_index(drop=True)


def iv_outside_quote(df: pd.DataFrame, tau: np.ndarray) -> np.ndarray:
    """For rows whose IV was given (not inverted here) and that carry a bid and an ask: how far (in vol) the given
    IV lies outside the band of IVs of its own bid and ask, after removing each (quote date, expiry, type)'s median
    offset between given and mid IVs (a dividend or rate the table does not carry moves the whole expiry, not one
    quote). 0 inside the band and where the check does not apply."""
    out = np.zeros(len(df))
    if not {"bid", "ask"} <= set(df.columns):
        return out
    m = (df["_iv_given"] & (df["ask"] > 0)).to_numpy()
    if not m.any():
        return out
    g = df[m]
    args = (g["forward"].to_numpy(), g["strike"].to_numpy(), tau[m], g["rate"].to_numpy(),
            (g["option_type"] == "C").to_numpy())
    lo = np.where(g["bid"] > 0, implied_vol(g["bid"].to_numpy(), *args)[0], 0.0)
    hi = implied_vol(g["ask"].to_numpy(), *args)[0]
    lo, hi = np.nan_to_num(lo, nan=0.0), np.nan_to_num(hi, nan=np.inf)
    given = g["implied_volatility"].to_numpy()
    mid = np.where(np.isfinite(hi), 0.5 * (lo + hi), given)
    offset = pd.Series(given - mid).groupby([g["quote_date"].to_numpy(), g["expiry"].to_numpy(),
                                             g["option_type"].to_numpy()]).transform("median").to_numpy()
    shifted = given - offset
    out[m] = np.maximum(lo - shifted, 0.0) + np.maximum(shifted - hi, 0.0)
    return out


def spread_vol(df: pd.DataFrame, tau: np.ndarray) -> pd.Series:
    """Bid/ask spread in volatility: ``iv_ask - iv_bid``, or ``(ask - bid) / vega``; 0 where unknown."""
    if {"iv_bid", "iv_ask"} <= set(df.columns):
        return (df["iv_ask"] - df["iv_bid"]).fillna(0.0)
    if {"bid", "ask"} <= set(df.columns):
        column = lambda name: df[name].to_numpy(np.float64)  # noqa: E731
        vega = bs_vega(column("forward"), column("strike"), tau, column("implied_volatility"), column("rate"))
        with np.errstate(divide="ignore", invalid="ignore"):
            width = (column("ask") - column("bid")) / vega
        return pd.Series(np.where(np.isnan(width), np.inf, width), index=df.index)
    return pd.Series(0.0, index=df.index)


def parity_forward(df: pd.DataFrame, price: pd.Series, tau: np.ndarray, n_pairs: int = 5) -> np.ndarray:
    """Per (quote date, expiry): the median over the ``n_pairs`` strikes nearest the money (smallest
    |C - P|) of ``K + (C - P) / D``, ``D = exp(-r T)``. NaN where the expiry has no call/put pair."""
    d = pd.DataFrame({"quote_date": df["quote_date"], "expiry": df["expiry"], "strike": df["strike"],
                      "type": df["option_type"], "price": price.to_numpy(), "disc": np.exp(-df["rate"].to_numpy() * tau)})
    d = d[np.isfinite(d["price"]) & (d["price"] > 0)]
    calls = d[d["type"] == "C"].drop(columns="type").rename(columns={"price": "c"})
    puts = d[d["type"] == "P"][["quote_date", "expiry", "strike", "price"]].rename(columns={"price": "p"})
    pairs = calls.merge(puts, on=["quote_date", "expiry", "strike"])
    pairs["gap"] = (pairs["c"] - pairs["p"]).abs()
    pairs["fwd"] = pairs["strike"] + (pairs["c"] - pairs["p"]) / pairs["disc"]
    pairs = pairs.sort_values("gap").groupby(["quote_date", "expiry"]).head(n_pairs)
    fwd = pairs.groupby(["quote_date", "expiry"])["fwd"].median().rename("_fwd")
    return df[["quote_date", "expiry"]].join(fwd, on=["quote_date", "expiry"])["_fwd"].to_numpy()


def check_usable(chain: pd.DataFrame, report: dict, path: str) -> None:
    """Quotes left after the drops, on at least two quote dates: a date's features come from its previous date."""
    dropped = {D.DROP_REASONS.get(k, k): v for k, v in report.get("dropped", {}).items() if v}
    if chain.empty:
        raise ValueError(f"data.path={path!r}: no quotes left after the checks ({report.get('loaded', 0)} row(s) "
                         f"loaded, dropped: {dropped or 'none'}); see the drop reasons for the option to relax")
    dates = chain["quote_date"].drop_duplicates().sort_values()
    if len(dates) < 2:
        raise ValueError(
            f"data.path={path!r} holds quotes of {len(dates)} quote date ({dates.iloc[0].date()}) after the checks: "
            "each row's features come from the previous quote date, and train, val and test need dates of their "
            "own, so give a history of several quote dates (check data.start_date/data.end_date and the drops"
            f"{': ' + str(dropped) if dropped else ''})")


def load(*, path: str, read_options: dict | None = None, quote_date_from_path: str | None = None,
         chunk_rows: int | None = None, cache_dir: str | None = None, **options: Any) -> D.Dataset:
    """A chain file (or glob of files) as a ready-to-train ``Dataset``; the data report says what was dropped and why.

    ``options``: the loader keys of ``ChainOptions`` and the pipeline keys of ``dataset.prepare``. ``chunk_rows``:
    read, check and featurize the files that many rows at a time (whole files in date order) and memory-map the
    splits from files under ``cache_dir`` (a chain larger than memory); null: all at once, in memory.
    """
    chain_options, pipeline = ChainOptions.pick(options)
    read: dict[str, Any] = dict(read_options=dict(read_options or {}), quote_date_from_path=quote_date_from_path)
    if chunk_rows:
        if not cache_dir:
            raise ValueError("data.chunk_rows needs data.cache_dir, the folder its memory-mapped arrays are written to")
        return build_dataset(read_chunks(path, chunk_rows=int(chunk_rows), **read), source=str(path),
                             options=chain_options, folder=Path(cache_dir), chunk_rows=int(chunk_rows), **pipeline)
    return build_dataset(read_table(path, **read), source=str(path), options=chain_options, **pipeline)


def build_dataset(raw: pd.DataFrame | Iterable[pd.DataFrame], *, source: str, options: ChainOptions,
                  folder: Path | None = None, chunk_rows: int | None = None, **pipeline: Any) -> D.Dataset:
    """The one path from a source's raw chain rows to a ``Dataset``: ``normalize`` (checks, IVs, quote filters),
    then ``dataset.prepare`` (features, targets, split, scaling), their reports merged in that order.

    ``raw``: one table, or chunks of consecutive quote dates (each date in one chunk) normalized one at a time
    (a file's checks see the whole file), cut into chains of at most ``chunk_rows`` rows of whole dates and
    prepared by ``dataset.prepare_chunks`` with its files in a temporary folder under ``folder``.
    """
    D.check_pipeline_keys(pipeline)
    report: dict = {}
    if isinstance(raw, pd.DataFrame):
        chain = normalize(raw, options, report=report)
        check_usable(chain, report, source)
        ds = D.prepare(chain, source=source, **pipeline)
    else:
        assert folder is not None, "chunks need a folder for their files"
        folder.mkdir(parents=True, exist_ok=True)
        # The arrays stay memory-mapped after their files are removed (POSIX): nothing is left in the cache.
        with tempfile.TemporaryDirectory(dir=folder, prefix="chunks-") as tmp:
            chains = (piece for part in raw for piece in D.by_dates(normalize(part, options, report=report),
                                                                    chunk_rows or len(part)))
            ds = D.prepare_chunks(chains, source=source, folder=Path(tmp), **pipeline)
    ds.report["dropped"] = {**report.pop("dropped"), **ds.report["dropped"]}
    ds.report = {"source": ds.report.pop("source"), **report, **ds.report}
    return ds
