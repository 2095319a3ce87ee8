"""``python -m vforge.predict``: implied volatilities from raw chain rows with a trained run's model.

The input goes through the same loader checks and feature code as training (``vforge.data``), so a
prediction is exactly what the run's test metrics measured: the model re-marks a quote date's contracts
from their terms, the day's spot and the previous date's surface (``data.horizon=0``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from vforge import CONF_DIR
from vforge.data.chain import ChainOptions, normalize, parse_dates, read_table
from vforge.data.dataset import CONTRACT, build_rows
from vforge.export import load_serving, resolve_checkpoint

log = logging.getLogger(__name__)
DUMMY_IV = 0.2  # stands in for an unquoted contract's IV: no feature of a row reads its own date's IVs


def normalize_options(data_cfg: dict) -> dict:
    """The run's loader settings (column names, units, quote filters) as ``normalize`` keyword arguments."""
    accepted = {f.name for f in dataclasses.fields(ChainOptions)}
    options = {k: v for k, v in data_cfg.items() if k in accepted}
    options.setdefault("columns", {})
    options.setdefault("iv_unit", "decimal")
    options.setdefault("rate", 0.0)
    options.setdefault("dividend_yield", 0.0)
    return options


def chain_rows(raw: pd.DataFrame, data_cfg: dict, date: str | None, report: dict) -> pd.DataFrame:
    """Feature rows (unscaled) of the contracts quoted on ``date`` (default: the last date in ``raw``)."""
    options = normalize_options(data_cfg)
    columns = {k: v for k, v in options["columns"].items() if v}
    date_col, iv_col = columns.get("quote_date", "quote_date"), columns.get("implied_volatility", "implied_volatility")
    if date_col not in raw.columns:
        raise ValueError(f"input has no quote date column {date_col!r}; it has {list(raw.columns)}")
    # dates parse as training parsed them (its data.date_format, two-digit years, time zones, per file)
    dates = parse_dates(raw if "_file" in raw.columns else raw.assign(_file="input"), date_col,
                         data_cfg.get("date_format"))
    try:
        target = pd.Timestamp(date).normalize() if date is not None else dates.max()
    except ValueError:
        raise ValueError(f"date={date!r} is not a date; give date=YYYY-MM-DD, one of the input's quote dates "
                         f"({dates.min().date()}..{dates.max().date()}), or leave it out for the last") from None
    if not (dates == target).any():
        raise ValueError(f"date={target.date()} is not in the input; its quote dates run {dates.min().date()}.."
                         f"{dates.max().date()}")
    history = raw[dates < target]
    if history.empty:
        raise ValueError(f"the input holds no quote date before {target.date()}: the model needs the previous date's "
                         "chain (its IVs, or bid/ask to invert them) beside the rows to predict")
    today = raw[dates == target]
    # Quotes of the date go through the run's filters as in training (a zero bid, a too-wide spread, ... is
    # dropped and counted); listed contracts with no quote at all get a stand-in IV so that they are re-marked too.
    quoted = pd.Series(False, index=today.index)
    bid, ask, price = (columns.get(c, c) for c in ("bid", "ask", "price"))
    if bid in today and ask in today:
        quoted |= today[bid].notna() & today[ask].notna()
    if price in today:
        quoted |= today[price].notna()
    if iv_col in today:
        quoted |= today[iv_col].notna()
    unquoted = today[~quoted].drop(columns=[bid, ask, price], errors="ignore")
    unquoted[iv_col] = DUMMY_IV * (100.0 if options["iv_unit"] == "percent" else 1.0)
    parts = [history, today[quoted], unquoted]
    chain = pd.concat([normalize(p, report=report, **options) for p in parts if len(p)], ignore_index=True)
    rows = build_rows(chain, horizon=0, fallback=data_cfg.get("fallback", "moneyness")).rows
    rows = rows[rows["quote_date"] == target].reset_index(drop=True)
    rows.attrs.clear()  # the pipeline's date index: internal, and it breaks later merges
    return rows


@contextlib.contextmanager
def predict_errors(data_cfg: dict) -> Iterator[None]:
    """The loader's errors with predict's own options in their hints: ``input=`` for ``data.path=``, and the run's
    column names for ``data.columns.X=...`` (predict takes no data options: the run's apply)."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(predict_hint(str(e), data_cfg)) from None


def predict_hint(message: str, data_cfg: dict) -> str:
    columns = {k: v for k, v in (data_cfg.get("columns") or {}).items() if v}

    def column(m: re.Match) -> str:
        name = m.group(1)
        return f"the input needs a column {columns.get(name, name)!r} (the run's data.columns.{name})"

    message = message.replace("data.path=", "input=")
    message = re.sub(r"Map yours with data\.columns, e\.g\. data\.columns\.(\w+)=<your column name>", column, message)
    message = re.sub(r"(?:map another column with )?data\.columns\.(\w+)=<your column>", column, message)
    if "data." in message:
        message += (" [predict reads the input with the run's data options (data.*), fixed when it was trained: "
                    "make the input match them]")
    return message


def predict_frame(serving: torch.nn.Module, ckpt: dict, raw: pd.DataFrame, date: str | None = None
                  ) -> tuple[pd.DataFrame, dict]:
    """Raw chain rows -> ``(predictions, report)``: IV levels (decimal) for the contracts of one quote date."""
    data_cfg = ckpt["config"]["data"]
    if data_cfg.get("horizon", 0) != 0:
        raise ValueError(f"predict re-marks a quote date (data.horizon=0); this model was trained with "
                         f"data.horizon={data_cfg['horizon']}")
    report: dict[str, Any] = {}
    with predict_errors(data_cfg):
        rows = chain_rows(raw, data_cfg, date, report)
    features = ckpt["feature_names"]
    ok = np.isfinite(rows[features].to_numpy(np.float64)).all(axis=1) & np.isfinite(rows["base"].to_numpy())
    rows = rows[ok].reset_index(drop=True)
    with torch.inference_mode():
        iv = serving(torch.as_tensor(rows[features].to_numpy(np.float32)),
                     torch.as_tensor(rows["base"].to_numpy(np.float32))).numpy()
    out = rows[["quote_date", *CONTRACT, "underlying_price"]].assign(
        implied_volatility=iv.astype(np.float64), baseline=rows["base"], new_contract=rows["prev_iv_missing"] > 0)
    return out, report


def predict(cfg: DictConfig) -> pd.DataFrame:
    """Predicted IV levels (decimal) for one quote date of ``cfg.input``, written to ``cfg.output``.

    ``cfg.run`` is a run folder, a model.pt, ``runs:/<id>``, or a registered model ``models:/<name>@<alias>``
    (``models:/<name>/<version>``), which is loaded as the MLflow pyfunc model that training registered.
    """
    registered = str(cfg.run).startswith("models:/")
    if registered:
        import mlflow

        if cfg.get("tracking_uri"):
            mlflow.set_tracking_uri(cfg.tracking_uri)
        model = mlflow.pyfunc.load_model(str(cfg.run))
        ckpt = model.unwrap_python_model().ckpt
    else:
        serving, ckpt = load_serving(resolve_checkpoint(cfg.run, cfg.get("tracking_uri")))
    data_cfg = ckpt["config"]["data"]  # the input is read as the run read its training chains
    with predict_errors(data_cfg):
        raw = read_table(cfg.input, read_options=dict(data_cfg.get("read_options") or {}),
                         quote_date_from_path=data_cfg.get("quote_date_from_path"))
    report: dict[str, Any]
    if registered:
        out, report = model.predict(raw, params={"date": cfg.date} if cfg.date else None), {}
    else:
        out, report = predict_frame(serving, ckpt, raw, cfg.date)
    output = Path(cfg.output) if cfg.output else Path(cfg.input).with_suffix(".iv.csv")
    output.parent.mkdir(parents=True, exist_ok=True)
    out.to_parquet(output, index=False) if output.suffix == ".parquet" else out.to_csv(output, index=False)
    dropped = {k: v for k, v in report.get("dropped", {}).items() if v}
    log.info("%d contracts re-marked on %s -> %s (%d without a previous quote; dropped: %s)", len(out),
             pd.Timestamp(out["quote_date"].iloc[0]).date() if len(out) else "-", output,
             int(out["new_contract"].sum()), dropped or "none")
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
