"""What the training loop shares with its callbacks and checkpoints: the state of a fit and its result.

It lives apart from the loop so that callbacks, checkpoints and the loop all import it and none of them
imports another to find it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from vforge.data.dataset import Dataset


class Stateful(Protocol):
    """What a checkpoint needs of a callback: a name to file its state under, and the state."""

    @property
    def name(self) -> str: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class FitState:
    """What callbacks see. ``eval_model`` is what validation, test and the saved model use: ``model`` itself,
    or the averaged copy once averaging has started. ``callbacks`` are all of the fit's callbacks, in call
    order (set by ``fit``): the checkpoint saves each one's state."""

    model: nn.Module
    data: Dataset
    optimizer: torch.optim.Optimizer
    scheduler: Any
    max_epochs: int
    batch_size: int
    steps_per_epoch: int
    generator: torch.Generator | None = None
    grad_scaler: torch.amp.GradScaler | None = None
    eval_model: nn.Module = None  # type: ignore[assignment]  # __post_init__: ``model`` until averaging starts
    epoch: int = 0  # the current epoch; after a resume, the first one to run
    step: int = 0  # optimizer steps taken
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    improved: bool = False
    best_epoch: int = -1
    best_value: float = float("inf")
    stop: bool = False
    callbacks: list[Stateful] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.eval_model = self.eval_model or self.model


@dataclass
class FitResult:
    best_epoch: int
    best_val_rmse: float
    epochs: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    model: nn.Module = None  # type: ignore[assignment]  # the evaluated (possibly averaged) model, holding its best weights
