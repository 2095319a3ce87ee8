"""A trained run as an MLflow pyfunc model that re-marks IVs from raw chain rows, and its logging/registration.

The pyfunc is a thin shell over ``vforge.serving.ChainModel``: the same loader checks, features and model as
``python -m vforge.predict``, so the run folder, the registry and ``mlflow models serve`` give the same answer.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from vforge.data.chain import REQUIRED
from vforge.serving import ChainModel, ModelBundle

# Canonical columns the loader reads beyond the required ones (DESIGN.md, "The data contract"), all optional.
OPTIONAL = ["underlying_price", "implied_volatility", "bid", "ask", "price", "iv_bid", "iv_ask", "rate",
            "dividend_yield", "forward", "time_to_expiry", "underlying", "volume", "open_interest"]
EXAMPLE_CONTRACTS = 5


class ChainIVModel(PythonModel):
    """``predict(raw chain rows) -> the re-marked IVs`` of the rows' last quote date (or ``params={"date": ...}``).

    The input is what ``python -m vforge.predict`` reads, in the run's schema: the contracts of the date to re-mark,
    with or without the previous date's rows (without: the run's last quote date's surface, which the model carries).
    The answer is ``vforge.serving.Remark.to_json()``: the date, the previous date used and whose it was, the
    rows dropped by reason and one record per contract re-marked. A request the model cannot answer raises an
    ``MlflowException`` (INVALID_PARAMETER_VALUE: HTTP 400 from ``mlflow models serve``) whose message is the cause.
    """

    def load_context(self, context: Any) -> None:
        checkpoint = Path(context.artifacts["checkpoint"])
        self.chain = ChainModel(ModelBundle.load(checkpoint), source=checkpoint)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> dict[str, Any]:
        try:
            return self.chain.remark(pd.DataFrame(model_input), (params or {}).get("date")).to_json()
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from e


def signature(bundle: ModelBundle) -> ModelSignature:
    """Raw chain columns in the run's naming, of any type (the loader checks and parses them as training did):
    the contract terms are required, the rest optional; the quote date to re-mark is the optional ``date`` param."""
    columns = {k: v for k, v in (bundle.data_config.get("columns") or {}).items() if v}
    required = [c for c in REQUIRED if not (c == "option_type" and bundle.data_config.get("option_type"))]
    specs: list[ColSpec | TensorSpec] = [ColSpec(AnyType(), columns.get(c, c), required=c in required) for c in [*REQUIRED, *OPTIONAL]]
    return ModelSignature(inputs=Schema(specs), params=ParamSchema([ParamSpec("date", "string", None)]))


def input_example(bundle: ModelBundle) -> pd.DataFrame | None:
    """A request of one date: a few contracts near the money on the business day after the run's last quote date
    (answered from the surface the model carries), in the run's column names, dates as ISO strings."""
    surface = bundle.surface_frame()
    if surface is None or surface.empty:
        return None
    day = (surface["quote_date"].max() + pd.offsets.BDay(1)).normalize()
    rows = surface[surface["expiry"] > day + pd.Timedelta(days=7)]
    if "underlying_price" in rows:
        rows = rows.iloc[np.argsort(np.abs(np.log(rows["strike"] / rows["underlying_price"])).to_numpy())]
    rows = rows.head(EXAMPLE_CONTRACTS)
    keep = [c for c in [*REQUIRED, "underlying_price", "bid", "ask", "rate", "dividend_yield"] if c in rows]
    if not {"bid", "ask"} <= set(keep):
        keep.append("implied_volatility")
    example = rows[keep].assign(quote_date=str(day.date()), expiry=rows["expiry"].dt.strftime("%Y-%m-%d"))
    columns = {k: v for k, v in (bundle.data_config.get("columns") or {}).items() if v}
    return example.rename(columns=columns).reset_index(drop=True)


@contextlib.contextmanager
def quiet_pyfunc() -> Iterator[None]:
    """While the model is logged: no CloudPickle warning and input-example note from ``mlflow.pyfunc`` (vforge
    chose both) and no artifact download bar (MLflow reads the example back to validate it); both put back after."""
    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    logger.setLevel(logging.ERROR)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        logger.setLevel(level)
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


@contextlib.contextmanager
def no_example_replay() -> Iterator[None]:
    """While the model is logged, MLflow does not load it back and predict its input example.

    ``log_model`` replays the example through a fresh copy of the pyfunc model (``_validate_serving_input``: the
    checkpoint loaded again, the request answered) only to log a warning if that fails; the artifacts it writes are
    the same either way. vforge's example is a request its model answers by construction (the next business day's
    contracts from the surface the model carries, ``input_example``) and the tests replay it (test_serving.py); in
    a run the replay cost about 0.2-0.5 s. A release of MLflow without that private hook is left as it is.
    """
    import mlflow.models.utils as model_utils

    real = getattr(model_utils, "_validate_serving_input", None)
    if real is None:
        yield
        return
    model_utils._validate_serving_input = lambda model_uri, serving_input: None
    try:
        yield
    finally:
        model_utils._validate_serving_input = real


def log_chain_model(checkpoint: str | Path, registered_model: str | None = None) -> str:
    """Log ``checkpoint`` as the pyfunc model ``chain_model`` of the active run (an MLflow logged model with a
    signature and an input example); register it when named. Returns the model URI.

    The requirements are named, not inferred: inference would re-import and time the model, and vforge is what the
    environment needs. The input example is not replayed through the logged model (``no_example_replay``).
    """
    bundle = ModelBundle.load(checkpoint)
    with quiet_pyfunc(), no_example_replay():
        info = mlflow.pyfunc.log_model(
            name="chain_model", python_model=ChainIVModel(), artifacts={"checkpoint": str(checkpoint)},
            signature=signature(bundle), input_example=input_example(bundle), registered_model_name=registered_model,
            pip_requirements=["vforge"],
        )
    return info.model_uri
