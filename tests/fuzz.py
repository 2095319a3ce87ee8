"""Seeded mutations of a valid chain file, and the oracle that judges what the loader made of them.

Shared by tests/test_fuzz.py (hypothesis draws the mutations) and scripts/fuzz_chains.py (N seeded cases, a
table of outcomes). Every case must end in one of two ways:

- ``named``: a ``ValueError``/``FileNotFoundError`` raised by vforge's own code (the rule, the file, the fix);
- ``accepted``: a ``Dataset`` whose rows add up (rows loaded = rows used + rows dropped), whose features and
  targets are finite, with no (date, contract) twice, and whose every row is either a row of the clean chain
  with its clean IV, or a mutated row whose values are still plausible.

Anything else is a failure: ``traceback`` (an exception from inside pandas/pyarrow/numpy, or any other type),
or ``wrong`` (accepted, but an invariant above fails).
"""

from __future__ import annotations

import functools
import io
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from vforge.data import chain as C
from vforge.data import dataset as D
from vforge.data.iv import bs_price

CONF = Path(__file__).resolve().parents[1] / "conf" / "data" / "chain.yaml"
VFORGE = str(Path(C.__file__).resolve().parents[1])
KEY = ["quote_date", "expiry", "strike", "option_type"]
NUMERIC = ["strike", "underlying_price", "implied_volatility", "bid", "ask", "rate", "dividend_yield"]
IV_LO, IV_HI = C.PLAUSIBLE["iv"]


def clean_chain(kind: str = "iv") -> pd.DataFrame:
    return _clean_chain(kind).copy()


@functools.lru_cache(maxsize=2)
def _clean_chain(kind: str) -> pd.DataFrame:
    """384 rows: 12 quote dates x 2 expiries x 8 strikes x call/put, priced on a smile.

    ``kind="iv"``: quotes carry their implied volatility (and a rate and dividend column); ``"price"``: bid/ask
    only, so the loader inverts IVs.
    """
    rng = np.random.default_rng(0)
    dates = pd.bdate_range("2024-03-01", periods=12)
    spot = 100.0 * np.exp(np.cumsum(rng.normal(0, 0.01, len(dates))))
    rows = []
    for i, d in enumerate(dates):
        for expiry in (pd.Timestamp("2024-04-19"), pd.Timestamp("2024-06-21")):
            tau = (expiry - d).days / 365
            fwd = spot[i] * np.exp(0.01 * tau)
            for k in np.arange(80.0, 120.0, 5.0):
                lm = np.log(k / fwd)
                vol = 0.2 - 0.1 * lm + 0.3 * lm**2 + 0.002 * i
                for typ in ("C", "P"):
                    p = float(bs_price(fwd, k, tau, vol, 0.02, typ == "C"))
                    row = {"quote_date": d.strftime("%Y-%m-%d"), "expiry": expiry.strftime("%Y-%m-%d"), "strike": k,
                           "option_type": typ, "underlying_price": spot[i]}
                    if kind == "iv":
                        row |= {"implied_volatility": vol, "rate": 0.02, "dividend_yield": 0.01}
                    else:
                        row |= {"bid": p - min(0.02, 0.5 * p), "ask": p + 0.02}
                    rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class Case:
    """A chain to write, the data options to load it with, and which of its rows carry corrupted values."""

    df: pd.DataFrame  # with an ``_id`` column (the clean row's position), dropped when written
    kind: str = "iv"
    fmt: str = "csv"
    options: dict = field(default_factory=dict)
    touched: set = field(default_factory=set)  # ids of the clean rows whose values were corrupted
    raw_bytes: bytes | None = None  # written instead of df (torn, empty or junk files)
    names: list = field(default_factory=list)


def _rows(rng, df, frac_max=0.3) -> np.ndarray:
    n = max(1, int(rng.integers(1, max(2, int(len(df) * frac_max)))))
    return rng.choice(len(df), size=min(n, len(df)), replace=False)


def _touch(case: Case, idx) -> None:
    case.touched.update(int(i) for i in case.df["_id"].iloc[idx])


def _cols(df) -> list[str]:
    return [c for c in df.columns if c != "_id"]


def _numeric_col(rng, df) -> str:
    return str(rng.choice([c for c in NUMERIC if c in df.columns]))


def _set(case: Case, idx, col, value) -> None:
    _touch(case, idx)
    case.df.loc[case.df.index[idx], col] = value


def m_nan(rng, case):
    _set(case, _rows(rng, case.df), str(rng.choice(_cols(case.df))), np.nan)


def m_inf(rng, case):
    _set(case, _rows(rng, case.df), _numeric_col(rng, case.df), float(rng.choice([np.inf, -np.inf])))


def m_extreme(rng, case):
    _set(case, _rows(rng, case.df), _numeric_col(rng, case.df), float(rng.choice([1e300, 1e-300, 1e-12, -1.0, 0.0, 3.0])))


def m_garbage(rng, case):
    _set(case, _rows(rng, case.df), str(rng.choice(_cols(case.df))), str(rng.choice(["abc", "", " ", "1,5", "N/A", "--"])))


def m_scale_rows(rng, case):
    """Some rows in another unit: IV (or bid/ask) x100 or /100, strike or spot x100, rate or dividend in percent."""
    col = str(rng.choice([c for c in ("implied_volatility", "strike", "underlying_price", "rate", "dividend_yield", "bid",
                                      "ask")
                          if c in case.df.columns]))
    idx = _rows(rng, case.df)
    factor = float(rng.choice([100.0, 0.01])) if col in ("implied_volatility", "bid", "ask") else 100.0
    _touch(case, idx)
    case.df.loc[case.df.index[idx], col] = pd.to_numeric(case.df[col].iloc[idx], errors="coerce") * factor


def m_percent_column(rng, case):
    """A whole IV column in percent, declared so: benign."""
    if "implied_volatility" in case.df.columns:
        case.df["implied_volatility"] = pd.to_numeric(case.df["implied_volatility"], errors="coerce") * 100
        case.options["iv_unit"] = "percent"


def m_date_format(rng, case):
    """Dates re-written in another format (two-digit years, day-first, mixed with ISO); declared half the time."""
    fmt = str(rng.choice(["%y-%m-%d", "%d/%m/%y", "%m/%d/%y", "%d/%m/%Y", "%m/%d/%Y", "%Y%m%d", "%d.%m.%Y"]))
    cols = [str(rng.choice(["quote_date", "expiry"]))] if rng.random() < 0.5 else ["quote_date", "expiry"]
    some = rng.random() < 0.3 and "%Y" in fmt  # only some rows: mixed with ISO
    idx = _rows(rng, case.df, 0.6) if some else np.arange(len(case.df))
    for col in cols:
        parsed = pd.to_datetime(case.df[col].iloc[idx], errors="coerce", format="ISO8601")
        case.df[col] = case.df[col].astype(object)
        case.df.loc[case.df.index[idx], col] = parsed.dt.strftime(fmt).where(parsed.notna(), case.df[col].iloc[idx])
    if not some and len(cols) == 2 and rng.random() < 0.5:
        case.options["date_format"] = fmt


def m_timezone(rng, case):
    idx = _rows(rng, case.df)
    suffix = str(rng.choice(["T16:00:00+00:00", " 00:00:00-05:00", "T09:30:00Z", " 16:00:00 UTC"]))
    case.df["quote_date"] = case.df["quote_date"].astype(object)
    case.df.loc[case.df.index[idx], "quote_date"] = case.df["quote_date"].iloc[idx].astype(str) + suffix


def m_rename(rng, case):
    """A column under another name, mapped by data.columns; sometimes onto a name the table also has."""
    col = str(rng.choice(["strike", "option_type", "quote_date", "underlying_price"]))
    if f"{col}_x" in case.df.columns:  # renamed once already: a second "<col>_x" is no table (Parquet refuses it)
        raise KeyError(f"{col}_x")
    case.df = case.df.rename(columns={col: f"{col}_x"})
    case.options.setdefault("columns", {})[col] = f"{col}_x"
    if rng.random() < 0.4:  # collision: a second, different column of the canonical name
        case.df[col] = case.df[f"{col}_x"].astype(str) + "9"
        _touch(case, np.arange(len(case.df)))


def m_drop_column(rng, case):
    case.df = case.df.drop(columns=str(rng.choice(_cols(case.df))))


def m_duplicate(rng, case):
    idx = _rows(rng, case.df, 0.1)
    _touch(case, idx)  # dropped with data.duplicates=drop: an ITM neighbour then keeps its own IV
    case.df = pd.concat([case.df, case.df.iloc[idx]], ignore_index=True)
    if rng.random() < 0.5:
        case.options["duplicates"] = str(rng.choice(["drop", "first"]))


def m_shuffle(rng, case):
    case.df = case.df.sample(frac=1.0, random_state=int(rng.integers(1 << 31))).reset_index(drop=True)


def m_one_date(rng, case):
    first = case.df["quote_date"].iloc[int(rng.integers(len(case.df)))]
    case.df = case.df[case.df["quote_date"] == first].reset_index(drop=True)


def m_expiry_before(rng, case):
    _set(case, _rows(rng, case.df, 0.05), "expiry", "2023-01-20")


def m_option_type(rng, case):
    _set(case, _rows(rng, case.df, 0.05), "option_type", str(rng.choice(["X", "call", "p", " C ", "Put"])))


def m_swap_bid_ask(rng, case):
    if {"bid", "ask"} <= set(case.df.columns):
        case.df = case.df.rename(columns={"bid": "ask", "ask": "bid"})
        _touch(case, np.arange(len(case.df)))


def m_whitespace(rng, case):
    for col in ("option_type", "strike"):
        case.df[col] = " " + case.df[col].astype(str) + " "


def m_date_window(rng, case):
    dates = sorted(clean_chain(case.kind)["quote_date"].unique())
    case.options["start_date"] = dates[int(rng.integers(0, 3))]
    case.options["end_date"] = dates[-1 - int(rng.integers(0, 3))]


def m_rate_column_percent(rng, case):
    """A rate column wholly in percent: refused in decimal, accepted with data.rate_unit=percent."""
    if "rate" in case.df.columns:
        case.df["rate"] = pd.to_numeric(case.df["rate"], errors="coerce") * 100
        if rng.random() < 0.6:
            case.options["rate_unit"] = "percent"


def m_file(rng, case):
    """The file itself: empty, header only, torn mid-row, or junk bytes appended."""
    what = str(rng.choice(["empty", "header", "torn", "junk"]))
    if what == "empty":
        case.raw_bytes = b""
    elif what == "header":
        case.df = case.df.iloc[:0]
    else:
        data = _encode(case.df, case.fmt)
        if what == "torn":
            case.raw_bytes = data[: int(rng.integers(1, len(data)))]
            _touch(case, np.arange(len(case.df)))  # any row may be the torn one
        else:
            case.raw_bytes = data + bytes(rng.integers(0, 256, 64, dtype=np.uint8))
            _touch(case, np.arange(len(case.df)))


def m_pipeline(rng, case):
    """Other pipeline options: a forecast horizon, the level as target, the other fallback, other fractions."""
    case.options["horizon"] = int(rng.choice([0, 1, 2]))
    case.options["target"] = str(rng.choice(["change", "level"]))
    case.options["fallback"] = str(rng.choice(["moneyness", "strike"]))
    case.options["val_fraction"] = float(rng.choice([0.15, 0.3, 0.5]))


def m_typed_dates(rng, case):
    """Dates as numbers (20240301, as a spreadsheet export may write them) or with a time of day: benign."""
    col = str(rng.choice(["quote_date", "expiry"]))
    parsed = pd.to_datetime(case.df[col], errors="coerce", format="ISO8601")
    if parsed.isna().any():
        return
    case.df[col] = (parsed.dt.strftime("%Y%m%d").astype(int) if rng.random() < 0.5
                    else parsed.dt.strftime("%Y-%m-%d 16:00:00"))


MUTATIONS = {name[2:]: fn for name, fn in globals().items() if name.startswith("m_")}


def _encode(df: pd.DataFrame, fmt: str) -> bytes:
    df = df.drop(columns="_id")
    buf = io.BytesIO()
    if fmt == "parquet":  # typed columns where the values allow (numbers, ISO dates), else text as in a CSV
        out = df.copy()
        for col in out.columns:
            try:
                out[col] = pd.to_numeric(out[col])
                continue
            except (ValueError, TypeError):
                pass
            try:
                if col in ("quote_date", "expiry"):
                    out[col] = pd.to_datetime(out[col], format="ISO8601")
                    continue
            except (ValueError, TypeError):
                pass
            out[col] = out[col].map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
        out.to_parquet(buf, index=False)
    else:
        df.to_csv(buf, index=False)
    return buf.getvalue()


def make_case(seed: int, names: list[str] | None = None, kind: str | None = None, fmt: str | None = None) -> Case:
    """A clean chain with 1-3 mutations (``names``, else drawn from ``seed``)."""
    rng = np.random.default_rng(seed)
    kind = kind or str(rng.choice(["iv", "price"]))
    case = Case(clean_chain(kind).astype(object).assign(_id=lambda d: np.arange(len(d))), kind=kind,
                fmt=fmt or str(rng.choice(["csv", "parquet"])))
    names = names or list(rng.choice(sorted(MUTATIONS), size=int(rng.integers(1, 4)), replace=True))
    for name in names:
        try:
            MUTATIONS[name](rng, case)
        except (KeyError, ValueError):  # the column it mutates was renamed or dropped by an earlier one
            continue
        case.df = case.df.astype(object)  # pandas' str columns refuse a float written into them
        case.names.append(name)
    return case


def load_options(path: str, **options) -> dict:
    """conf/data/chain.yaml's defaults with ``path`` and ``options`` over them, as ``chain.load`` keywords."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF), resolve=True)
    cfg.pop("_target_")
    columns = cfg["columns"] | options.pop("columns", {})
    return cfg | {"path": path, "columns": columns} | options


_BASELINES: dict = {}


def baseline(kind: str, tmp: Path, options: dict | None = None) -> dict:
    """(date, contract) -> target IV of every row the clean chain gives (before the split and its embargo) with
    the mutated case's ``horizon``."""
    horizon = int((options or {}).get("horizon", 0))
    key = (kind, horizon)
    if key not in _BASELINES:
        path = tmp / f"clean-{kind}.csv"
        clean_chain(kind).to_csv(path, index=False)
        opts = load_options(str(path))
        read, _ = C.ChainOptions.pick(opts)
        chain = C.normalize(C.read_table(path), read, report={})
        rows = D.build_rows(chain, horizon=horizon).rows
        _BASELINES[key] = dict(zip(_keys(rows), rows["iv"]))
    return _BASELINES[key]


def _keys(rows: pd.DataFrame) -> list[tuple]:
    return [(str(pd.Timestamp(d).date()), str(pd.Timestamp(e).date()), float(k), t)
            for d, e, k, t in rows[KEY].itertuples(index=False)]


def run_case(case: Case, tmp: Path) -> tuple[str, str]:
    """Load ``case`` and judge it: ``(outcome, detail)`` with outcome named | accepted | traceback | wrong."""
    path = tmp / f"case.{case.fmt}"
    path.write_bytes(case.raw_bytes if case.raw_bytes is not None else _encode(case.df, case.fmt))
    try:
        ds = C.load(**load_options(str(path), **case.options))
    except Exception as e:  # noqa: BLE001 - judged here
        inner = traceback.extract_tb(e.__traceback__)[-1]
        named = isinstance(e, (ValueError, FileNotFoundError)) and inner.filename.startswith(VFORGE)
        where = f"{Path(inner.filename).name}:{inner.lineno}"
        return ("named" if named else "traceback"), f"{type(e).__name__} at {where}: {str(e)[:200]}"
    problems = check_accepted(ds, case, baseline(case.kind, tmp, case.options))
    return ("wrong", "; ".join(problems)) if problems else ("accepted", "")


def check_accepted(ds, case: Case, clean: dict) -> list[str]:
    """What is wrong with an accepted dataset (empty: nothing)."""
    problems = []
    r = ds.report
    used, dropped = r["rows"], sum(r["dropped"].values())
    if r["loaded"] != used + dropped:
        problems.append(f"rows loaded {r['loaded']} != used {used} + dropped {dropped} ({r['dropped']})")
    splits = (ds.train, ds.val, ds.test)
    for name, s in zip(("train", "val", "test"), splits):
        for what, t in (("x_num", s.x_num), ("y", s.y)):
            if not np.isfinite(t.numpy()).all():
                problems.append(f"non-finite {what} in {name}")
        if not np.isfinite(s.iv).all() or ((s.iv < IV_LO) | (s.iv > IV_HI)).any():
            problems.append(f"target IV outside {IV_LO}..{IV_HI} in {name}: max {np.nanmax(s.iv):.4g}")
    keys = [k for s in splits for k in _keys(s.rows)]
    if len(set(keys)) != len(keys):
        problems.append("a (date, contract) is used twice")
    ivs = np.concatenate([s.iv for s in splits])
    touched = set(_keys(clean_chain(case.kind).iloc[sorted(case.touched)]))
    # with data.itm_from_otm an ITM row takes the IV of the OTM quote at its strike: that one may be the mutated one
    touched |= {k for k in keys if k[:3] in {t[:3] for t in touched}}
    if case.options.get("horizon"):  # a row's target is its contract's IV on a later date, which may be the mutated one
        contracts = {k[1:] for k in touched}
        touched |= {k for k in keys if k[1:] in contracts}
    alien = [k for k, iv in zip(keys, ivs) if k not in touched and (k not in clean or abs(clean[k] - iv) > 1e-9)]
    if alien:
        k = alien[0]
        problems.append(f"{len(alien)} row(s) not in the clean chain or with another IV, e.g. {k}: "
                        f"{clean.get(k)} -> {ivs[keys.index(k)]}")
    return problems
