"""Serving a trained run: what ``model.pt`` holds, finding and loading a run, rebuilding its model, and the model
with the data pipeline's scaling folded in (``Serving``).

``python -m vforge.predict`` and ``python -m vforge.export`` are thin mains over this module, and the MLflow
pyfunc model in ``vforge.tracking.registry`` loads through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from vforge.data.target import to_level
from vforge.training.checkpoint import atomic_save
from vforge.training.losses import Loss


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


def load_serving(checkpoint: str | Path) -> tuple[Serving, dict[str, Any]]:
    """``checkpoint`` (a model.pt of vforge.train) -> its model wrapped in ``Serving`` (eval mode) and the
    checkpoint as the dict it was saved as."""
    bundle = ModelBundle.load(checkpoint)
    return bundle.serving(checkpoint), bundle.to_dict()
