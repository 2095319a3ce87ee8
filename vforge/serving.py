"""Serving a trained run: what ``model.pt`` holds (``ModelBundle``), finding and loading a run (folder, model.pt,
``runs:/``, ``models:/``), the model with the data pipeline's scaling folded in (``Serving``), and raw chain rows ->
features -> IVs (``ChainModel.remark``), which the MLflow pyfunc model (``vforge.tracking.registry``) answers with.

``python -m vforge.predict`` and ``python -m vforge.export`` are thin mains over this module.

Re-marking (``data.horizon=0``): the contracts of one quote date get IVs from their terms, the day's spot and the
previous date's surface, through the same loader checks and feature code as training. The previous date is the
request's own (its latest date before the one re-marked) or, for a request of one date, the surface of the run's last
quote date, which the model carries.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import statistics
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from torch import Tensor, nn
from torch.utils import benchmark

from vforge.data.chain import ChainOptions, ColumnHint, normalize, parse_dates
from vforge.data.dataset import CONTRACT, DROP_REASONS, InfoDates, info_dates, next_date_columns
from vforge.data.target import to_level
from vforge.training.checkpoint import atomic_save
from vforge.training.losses import Loss

DUMMY_IV = 0.2  # stands in for an unquoted contract's IV: no feature of a row reads its own date's IVs
OUTPUT_COLUMNS = ["quote_date", *CONTRACT, "underlying_price", "implied_volatility", "baseline", "new_contract"]


@dataclass
class ModelBundle:
    """Everything ``model.pt`` holds: the trained weights, the run's resolved config, and what turns raw features into
    model inputs and model outputs into IV levels. Saved as a plain dict of these fields (``torch.load`` of a
    model.pt gives that dict); files written before a field existed load with its default.

    ``x_mean``/``x_std`` (n_num,) scale the unscaled features ``feature_names``; ``y_center``/``y_scale`` and
    ``target`` map outputs to levels (``vforge.data.target.to_level``); ``output_index`` is the point prediction's
    column of the ``d_out`` outputs (the median of ``quantiles``); ``surface`` is the canonical chain rows of the
    run's last quote date (column -> array), from which a served model re-marks the next date.
    """

    state_dict: dict[str, Tensor]
    config: dict[str, Any]
    feature_names: list[str]
    x_mean: np.ndarray
    x_std: np.ndarray
    y_center: float
    y_scale: float
    target: str
    d_out: int = 1
    output_index: int = 0
    quantiles: list[float] | None = None
    cat_cardinalities: list[int] = field(default_factory=list)
    surface: dict[str, np.ndarray] | None = None

    @classmethod
    def of(cls, model: nn.Module, data: Any, loss_fn: Loss, config: dict[str, Any]) -> ModelBundle:
        """The bundle of a trained ``model`` on ``data`` (a ``vforge.data.dataset.Dataset``) with ``loss_fn``."""
        last = getattr(data, "last_chain", None)
        return cls(state_dict=model.state_dict(), config=config, feature_names=list(data.feature_names),
                   x_mean=data.x_mean, x_std=data.x_std, y_center=data.y_center, y_scale=data.y_scale,
                   target=data.target, d_out=loss_fn.d_out, output_index=loss_fn.point_index,
                   quantiles=loss_fn.quantiles, cat_cardinalities=list(data.cat_cardinalities),
                   surface=None if last is None else {c: last[c].to_numpy() for c in last.columns})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelBundle:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | Path) -> None:
        """Write ``path`` atomically (a crash leaves the old file or the new one)."""
        atomic_save(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> ModelBundle:
        return cls.from_dict(torch.load(path, map_location="cpu", weights_only=False))

    @property
    def data_config(self) -> dict[str, Any]:
        """The run's data options (``data.*``): how its chains were read, checked and turned into features."""
        return dict(self.config.get("data") or {})

    def surface_frame(self) -> pd.DataFrame | None:
        """``surface`` as a frame (None for a model.pt written before it was saved)."""
        return None if self.surface is None else pd.DataFrame(self.surface)

    def build_model(self) -> nn.Module:
        """The trained model rebuilt from its config and weights, in eval mode; an averaged model's weights
        (``module.*``) load into the plain model."""
        model = instantiate(self.config["model"], n_num=len(self.feature_names),
                            cat_cardinalities=list(self.cat_cardinalities or []), d_out=int(self.d_out))
        state = self.state_dict
        if any(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}
        model.load_state_dict(state)
        return model.eval()

    def serving(self, source: str | Path = "model.pt") -> Serving:
        """The model with its scaling folded in (numeric features only); ``source`` names it in errors."""
        cat_features = list(self.data_config.get("cat_features") or [])
        if self.cat_cardinalities or cat_features:
            raise ValueError(
                f"{source} was trained with categorical features ({cat_features or self.cat_cardinalities}); export "
                "supports numeric-only models for now; retrain with data.cat_features=[]")
        return Serving(self.build_model(), x_mean=self.x_mean, x_std=self.x_std, y_center=self.y_center,
                       y_scale=self.y_scale, target=self.target, output_index=self.output_index).eval()


class Serving(nn.Module):
    """A trained model with the data pipeline's scaling folded in.

    Shape:
        x_num: (batch, n_num) unscaled features in the order of ``feature_names``
        base: (batch,) the IV a predicted change is added to (ignored for target 'level')
        returns: (batch,) the IV level (decimal)
    """

    x_mean: Tensor  # buffers
    x_std: Tensor

    def __init__(self, model: nn.Module, *, x_mean: np.ndarray, x_std: np.ndarray, y_center: float, y_scale: float,
                 target: str, output_index: int) -> None:
        super().__init__()
        if target not in ("level", "change"):
            raise ValueError(f"target must be 'level' or 'change', got {target!r}")
        self.model = model
        self.register_buffer("x_mean", torch.as_tensor(np.asarray(x_mean), dtype=torch.float32))
        self.register_buffer("x_std", torch.as_tensor(np.asarray(x_std), dtype=torch.float32))
        self.y_center, self.y_scale = float(y_center), float(y_scale)
        self.change, self.output_index = target == "change", int(output_index)

    def forward(self, x_num: Tensor, base: Tensor) -> Tensor:
        out = self.model((x_num - self.x_mean) / self.x_std, None)[:, self.output_index]  # (batch,)
        level = to_level(out, y_center=self.y_center, y_scale=self.y_scale, base=base if self.change else None)
        # zeros_like keeps ``base`` an input of every exported graph (ONNX drops unused ones), so all artifacts share
        # one signature, and a NaN base still cannot reach a level prediction.
        return level if self.change else level + torch.zeros_like(base)


def resolve_checkpoint(run: str | Path, tracking_uri: str | None = None) -> Path:
    """``run`` -> a local model.pt path. ``run`` is a run folder, a model.pt, or an MLflow run as ``runs:/<run_id>``
    (its logged ``model/model.pt`` is downloaded; ``tracking_uri`` or ``MLFLOW_TRACKING_URI`` says where)."""
    if str(run).startswith("runs:/"):
        import mlflow

        run_id = str(run).removeprefix("runs:/").strip("/").split("/")[0]
        try:
            return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model/model.pt",
                                                            tracking_uri=tracking_uri))
        except Exception as e:  # MLflow raises several types for a missing run or artifact
            raise FileNotFoundError(f"run={run!r}: could not fetch model/model.pt from MLflow at "
                                    f"{tracking_uri or mlflow.get_tracking_uri()} ({e})") from e
    path = Path(run)
    if path.is_dir():
        if not (path / "model.pt").is_file():
            raise FileNotFoundError(
                f"run={str(run)!r} has no model.pt; a finished `python -m vforge.train` run writes one into its "
                "folder (outputs/runs/<time>_<model>); pass that folder or the model.pt itself")
        return path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"run={str(run)!r} does not exist; pass a training run's folder, its model.pt or "
                                "runs:/<mlflow run id>")
    return path


def median_ms(fn: Callable[[], Any], repeats: int = 20, warmup: int = 1) -> float:
    """Median wall time of one call of ``fn`` in ms, over ``repeats`` calls after ``warmup`` ones: the one latency
    timer of vforge (export, the leaderboard, scripts/bench_serving.py), ``torch.utils.benchmark.Timer`` on the
    caller's thread count (its default is one thread)."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    for _ in range(warmup):
        fn()
    return statistics.median(timer.timeit(1).mean for _ in range(max(repeats, 1))) * 1e3


def load_serving(checkpoint: str | Path) -> tuple[Serving, dict[str, Any]]:
    """``checkpoint`` (a model.pt of vforge.train) -> its model wrapped in ``Serving`` (eval mode) and the
    checkpoint as the dict it was saved as."""
    bundle = ModelBundle.load(checkpoint)
    return bundle.serving(checkpoint), bundle.to_dict()


def load_run(run: str | Path, tracking_uri: str | None = None) -> ChainModel:
    """A trained run ready to re-mark chains. ``run`` is a run folder, a model.pt, ``runs:/<run_id>``, or a registered
    model ``models:/<name>/<version>`` (``models:/<name>@<alias>``), loaded as the pyfunc model training registered."""
    if str(run).startswith("models:/"):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        return mlflow.pyfunc.load_model(str(run)).unwrap_python_model().chain
    checkpoint = resolve_checkpoint(run, tracking_uri)
    return ChainModel(ModelBundle.load(checkpoint), source=checkpoint)


def input_column_hint(columns: Mapping[str, str | None]) -> ColumnHint:
    """The loader's hint for a missing column when the columns are the run's (fixed when it was trained)."""
    mapped = {k: v for k, v in columns.items() if v}
    return lambda name: f"the input needs a column {mapped.get(name, name)!r} (the run's data.columns.{name})"


@contextlib.contextmanager
def run_options_note() -> Iterator[None]:
    """Loader errors that still name a ``data.*`` option say that those are the run's, fixed when it was trained."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        if "data." not in str(e):
            raise
        raise type(e)(f"{e} [predict reads the input with the run's data options (data.*), fixed when it was "
                      "trained: make the input match them]") from None


@dataclass
class Remark:
    """The answer to one re-marking request.

    ``ivs``: one row per contract re-marked (``OUTPUT_COLUMNS``: IV level in decimal, the baseline it moved from,
    ``new_contract`` where it had no previous quote). ``previous_date`` is the surface the features came from,
    ``previous_from`` says whose: ``request`` or ``model`` (the run's last quote date). ``contracts`` rows of the request
    are of ``date``; each is re-marked or counted in ``dropped`` by reason; ``previous_dropped`` counts the request's
    rows of earlier dates the loader dropped.
    """

    ivs: pd.DataFrame
    date: pd.Timestamp
    previous_date: pd.Timestamp
    previous_from: str
    rows: int
    contracts: int
    dropped: dict[str, int]
    previous_dropped: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        """The answer as JSON types (what the REST service returns; dates as YYYY-MM-DD)."""
        # the records of ``to_dict(orient="records")`` (Python scalars), built from each column's list at once
        columns = {c: (np.datetime_as_string(self.ivs[c].to_numpy(), unit="D") if c in ("quote_date", "expiry")
                       else self.ivs[c]).tolist() for c in self.ivs.columns}
        return {"date": str(self.date.date()), "previous_date": str(self.previous_date.date()),
                "previous_from": self.previous_from, "rows": self.rows, "contracts": self.contracts,
                "re_marked": len(self.ivs), "dropped": self.dropped, "previous_dropped": self.previous_dropped,
                "ivs": [dict(zip(columns, row)) for row in zip(*columns.values())]}


class ChainModel:
    """A trained run that re-marks chains: raw rows in the run's schema -> IVs (``remark``)."""

    def __init__(self, bundle: ModelBundle, source: str | Path = "model.pt") -> None:
        self.bundle, self.source = bundle, str(source)
        self.module = bundle.serving(source)
        self.data_cfg = bundle.data_config
        self.options = loader_options(self.data_cfg)
        self.columns: dict[str, str] = {k: v for k, v in self.options.columns.items() if v}
        self.column_hint = input_column_hint(self.columns)
        self.surface = bundle.surface_frame()  # canonical rows of the run's last quote date (None: older model.pt)
        self._surface_info: InfoDates | None = None
        # A service re-marks many requests against one previous date: its rows are checked and normalized once, and
        # what the next date's features read of them (``InfoDates``) is built once.
        self._histories: OrderedDict[bytes, tuple[pd.DataFrame, dict[str, Any], InfoDates]] = OrderedDict()

    def remark(self, raw: pd.DataFrame, date: str | None = None) -> Remark:
        """Raw chain rows -> IVs of the contracts of ``date`` (default: the last date in ``raw``)."""
        horizon = self.data_cfg.get("horizon", 0)
        if horizon != 0:
            raise ValueError(f"predict re-marks a quote date (data.horizon=0); this model was trained with "
                             f"data.horizon={horizon}")
        with run_options_note():
            chain, previous, info = self.chain(raw, date)
            # the date's rows and features exactly as build_rows gives them on the previous date(s) and this one
            rows, columns = next_date_columns(previous, chain, fallback=self.data_cfg.get("fallback", "moneyness"))
        x = np.column_stack([columns[name] for name in self.bundle.feature_names]).astype(np.float64, copy=False)
        base = columns["base"]
        has_base = np.isfinite(base)
        ok = has_base & np.isfinite(x).all(axis=1)
        dropped = {**info["dropped"], "drop_no_previous_surface": info["normalized"] - int(has_base.sum()),
                   "drop_missing_feature": int((has_base & ~ok).sum())}
        if not ok.all():
            rows, x, base, columns = (rows[ok].reset_index(drop=True), x[ok], base[ok],
                                      {"prev_iv_missing": columns["prev_iv_missing"][ok]})
        with torch.inference_mode():
            iv = self.module(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(base.astype(np.float32))).numpy()
        out = rows[["quote_date", *CONTRACT, "underlying_price"]].assign(
            implied_volatility=iv.astype(np.float64), baseline=base, new_contract=columns["prev_iv_missing"] > 0)
        return Remark(out, info["date"], info["previous_date"], info["previous_from"], len(raw), info["contracts"],
                      {k: v for k, v in dropped.items() if v}, {k: v for k, v in info["previous_dropped"].items() if v})

    def normalized_history(self, rows: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any], InfoDates]:
        """``normalize`` of the request's earlier dates with its report and what the next date reads of them
        (``InfoDates``), remembered by the rows' content (the last ``HISTORY_CACHE`` distinct ones): the same rows
        give the same canonical chain, so it is computed once."""
        key = hashlib.blake2b(pd.util.hash_pandas_object(rows, index=False).to_numpy().tobytes()
                              + "\0".join(map(str, rows.columns)).encode(), digest_size=16).digest()
        if key in self._histories:
            self._histories.move_to_end(key)
        else:
            report: dict[str, Any] = {}
            history = normalize(rows, self.options, report=report, column_hint=self.column_hint)
            self._histories[key] = history, report, info_dates(history) if len(history) else EMPTY_INFO
            if len(self._histories) > HISTORY_CACHE:
                self._histories.popitem(last=False)
        history, report, info = self._histories[key]
        return history, copy.deepcopy(report), info

    def surface_info(self) -> InfoDates:
        """``InfoDates`` of the surface the model carries (built on first use)."""
        assert self.surface is not None
        if self._surface_info is None:
            self._surface_info = info_dates(self.surface)
        return self._surface_info

    def chain(self, raw: pd.DataFrame, date: str | None) -> tuple[pd.DataFrame, InfoDates, dict[str, Any]]:
        """The canonical chain of ``date``, what its features read of the previous date(s) (``InfoDates``), and what
        was kept and dropped of each."""
        date_col = self.columns.get("quote_date", "quote_date")
        iv_col = self.columns.get("implied_volatility", "implied_volatility")
        if date_col not in raw.columns:
            raise ValueError(f"input has no quote date column {date_col!r}; it has {list(raw.columns)}")
        # dates parse as training parsed them (its data.date_format, two-digit years, time zones, per file)
        which = raw[[date_col, "_file"]] if "_file" in raw.columns else raw[[date_col]].assign(_file="input")
        dates = parse_dates(which, date_col, self.data_cfg.get("date_format"), column_hint=self.column_hint)
        try:
            target = pd.Timestamp(date).normalize() if date is not None else dates.max()
        except ValueError:
            raise ValueError(f"date={date!r} is not a date; give date=YYYY-MM-DD, one of the input's quote dates "
                             f"({dates.min().date()}..{dates.max().date()}), or leave it out for the last") from None
        if not (dates == target).any():
            raise ValueError(f"date={target.date()} is not in the input; its quote dates run {dates.min().date()}.."
                             f"{dates.max().date()}")
        history_raw = raw[dates < target]
        history_report: dict[str, Any] = {}
        if len(history_raw):
            history, history_report, previous = self.normalized_history(history_raw)
            source = "request"
        elif self.surface is not None and len(self.surface) and self.surface["quote_date"].max() < target:
            history, source, previous = self.surface, "model", self.surface_info()
        else:
            stored = ("" if self.surface is None else
                      f", and the model's own surface is of {self.surface['quote_date'].max().date()}, not before it")
            raise ValueError(f"the input holds no quote date before {target.date()}{stored}: the model needs the "
                             "previous date's chain (its IVs, or bid/ask to invert them) beside the rows to predict")
        on_date = (dates == target).to_numpy()
        today = raw[on_date].assign(**{date_col: dates.to_numpy()[on_date]})  # parsed once; the loader takes them so
        # Quotes of the date go through the run's filters as in training (a zero bid, a too-wide spread, ... is
        # dropped and counted); listed contracts with no quote at all get a stand-in IV so that they are re-marked too.
        quoted = pd.Series(False, index=today.index)
        bid, ask, price = (self.columns.get(c, c) for c in ("bid", "ask", "price"))
        if bid in today and ask in today:
            quoted |= today[bid].notna() & today[ask].notna()
        if price in today:
            quoted |= today[price].notna()
        if iv_col in today:
            quoted |= today[iv_col].notna()
        parts = [today]
        if not quoted.all():
            unquoted = today[~quoted].drop(columns=[bid, ask, price], errors="ignore")
            unquoted[iv_col] = DUMMY_IV * (100.0 if self.options.iv_unit == "percent" else 1.0)
            parts = [p for p in (today[quoted], unquoted) if len(p)]
        report: dict[str, Any] = {}
        parts = [normalize(p, self.options, report=report, column_hint=self.column_hint) for p in parts]
        chain = parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
        if history.empty:  # every previous-date row dropped by the checks
            raise ValueError(f"no quote of the input's dates before {target.date()} is left after the checks "
                             f"(dropped: {_named(history_report.get('dropped', {}))}): the model needs the previous "
                             "date's chain")
        return chain, previous, {"date": target, "previous_date": history["quote_date"].max(),
                                 "previous_from": source, "contracts": len(today), "normalized": len(chain),
                                 "dropped": dict(report.get("dropped", {})),
                                 "previous_dropped": dict(history_report.get("dropped", {}))}


HISTORY_CACHE = 8  # previous-date chains kept normalized per loaded model
EMPTY_INFO = InfoDates(dates=pd.DatetimeIndex([]), spot=pd.Series(dtype=np.float64), nodes=pd.DataFrame(),
                       state=pd.DataFrame())  # a request's earlier dates with no quote left: an error, see ``chain``


def _named(dropped: dict[str, int]) -> str:
    named = {DROP_REASONS.get(k, k): v for k, v in dropped.items() if v}
    return str(named) if named else "none"


def loader_options(data_cfg: dict[str, Any]) -> ChainOptions:
    """The run's loader settings (column names, units, quote filters); not its training window
    (``data.start_date``/``end_date``): a served model re-marks dates after it."""
    options, _ = ChainOptions.pick(data_cfg)
    return dataclasses.replace(options, columns=dict(options.columns or {}), start_date=None, end_date=None)
