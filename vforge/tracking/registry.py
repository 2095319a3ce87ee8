"""A trained run as an MLflow pyfunc model that predicts IV from raw chain rows, and its registration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class ChainIVModel(PythonModel):
    """``predict(raw chain rows) -> IV per contract`` of the last quote date (or ``params={"date": ...}``).

    The input is what ``python -m vforge.predict`` reads: the run's schema, the date to re-mark and the
    previous quote date. The checkpoint travels as the model's artifact; the code is vforge's own.
    """

    def load_context(self, context: Any) -> None:
        from vforge.export import load_serving

        self.serving, self.ckpt = load_serving(Path(context.artifacts["checkpoint"]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from vforge.predict import predict_frame

        out, _ = predict_frame(self.serving, self.ckpt, model_input, (params or {}).get("date"))
        return out


def log_chain_model(checkpoint: str | Path, registered_model: str | None = None) -> str:
    """Log ``checkpoint`` as the pyfunc model ``chain_model`` of the active run; register it when named.

    Returns the model URI. The requirements are named, not inferred: inference would re-import and time
    the model, and vforge is what the environment needs.
    """
    info = mlflow.pyfunc.log_model(
        name="chain_model", python_model=ChainIVModel(), artifacts={"checkpoint": str(checkpoint)},
        registered_model_name=registered_model, pip_requirements=["vforge"],
    )
    return info.model_uri
