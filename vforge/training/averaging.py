"""Weight averaging (EMA, SWA, Polyak) as training callbacks, built on ``torch.optim.swa_utils``.

Once averaging has started, validation, test and the saved model use the averaged weights
(``state.eval_model``); the loop logs the raw weights' validation RMSE beside them
(``val/raw_rmse_epoch``). Models with batch norm get their averaged BN statistics recomputed with
``update_bn`` (SWA, Polyak; EMA averages the BN buffers along with the weights).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn, update_bn

from vforge.training.callbacks import Callback

if TYPE_CHECKING:
    from vforge.training.state import FitState


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class _Rows(nn.Module):
    """Adapter for ``update_bn``, which calls ``model(batch)``: batches of row indices into one split."""

    def __init__(self, model: nn.Module, x_num: torch.Tensor, x_cat: torch.Tensor | None) -> None:
        super().__init__()
        self.model, self.x_num, self.x_cat = model, x_num, x_cat

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(self.x_num[idx], None if self.x_cat is None else self.x_cat[idx])


class Averaging(Callback):
    """Common machinery: an ``AveragedModel`` of ``state.model`` that becomes ``state.eval_model`` at its first
    update. Subclasses say when to update (every step or every epoch) and how (``avg`` function)."""

    use_buffers = False
    per_step = True

    def __init__(self, start_fraction: float = 0.0) -> None:
        if not 0 <= start_fraction < 1:
            raise ValueError(f"start_fraction must be in [0, 1), got {start_fraction=}")
        self.start_fraction = start_fraction
        self.averaged: AveragedModel | None = None
        self._state: FitState | None = None

    @property
    def name(self) -> str:
        return "averaging"

    @property
    def model(self) -> AveragedModel:
        """The averaged copy, built in ``on_fit_start``."""
        if self.averaged is None:
            raise RuntimeError(f"{type(self).__name__} is used before on_fit_start built its averaged model")
        return self.averaged

    @property
    def state(self) -> FitState:
        if self._state is None:
            raise RuntimeError(f"{type(self).__name__} is used before on_fit_start")
        return self._state

    def make(self, model: nn.Module) -> AveragedModel:
        return AveragedModel(model, use_buffers=self.use_buffers)

    def on_fit_start(self, state: FitState) -> None:
        self.averaged = self.make(state.model)
        self._state = state
        if self.per_step:
            self.start = int(self.start_fraction * state.steps_per_epoch * state.max_epochs)
        else:
            self.start = int(self.start_fraction * state.max_epochs)

    @property
    def active(self) -> bool:
        return self.averaged is not None and int(self.averaged.n_averaged) > 0

    def update(self, state: FitState) -> None:
        self.model.update_parameters(state.model)
        state.eval_model = self.model.module

    def on_step_end(self, state: FitState) -> None:
        if self.per_step and state.step > self.start:
            self.update(state)

    def on_train_epoch_end(self, state: FitState) -> None:
        if not self.per_step and state.epoch >= self.start:
            self.update(state)
        if self.active and not self.use_buffers and has_batch_norm(self.model.module):
            train = state.data.train
            batches = torch.randperm(len(train.x_num), generator=torch.Generator().manual_seed(0)).split(state.batch_size)
            update_bn(batches, _Rows(self.model.module, train.x_num, train.x_cat))

    def state_dict(self) -> dict[str, Any]:
        return {"averaged": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["averaged"])
        if self.active:
            self.state.eval_model = self.model.module


class EMA(Averaging):
    """Exponential moving average of the weights (and BN buffers), updated every optimizer step:
    w_ema <- decay w_ema + (1 - decay) w. ``decay`` 0.999 averages over ~1000 steps."""

    use_buffers = True

    def __init__(self, decay: float = 0.999, start_fraction: float = 0.0) -> None:
        super().__init__(start_fraction)
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay=}")
        self.decay = decay

    def make(self, model: nn.Module) -> AveragedModel:
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)


class Polyak(Averaging):
    """Polyak-Ruppert averaging: the uniform mean of the weights after every optimizer step from
    ``start_fraction`` of training on."""


class SWA(Averaging):
    """Stochastic weight averaging (Izmailov et al. 2018, https://arxiv.org/abs/1803.05407): from
    ``start_fraction`` of the epochs on, the learning rate is annealed to ``swa_lr`` by ``SWALR`` (replacing
    the configured scheduler) and the weights are averaged uniformly at the end of each epoch."""

    per_step = False

    def __init__(self, swa_lr: float = 1e-4, start_fraction: float = 0.75, anneal_epochs: int = 2,
                 anneal_strategy: Literal["cos", "linear"] = "cos") -> None:
        super().__init__(start_fraction)
        if swa_lr <= 0:
            raise ValueError(f"swa_lr must be > 0, got {swa_lr=}")
        self.swa_lr, self.anneal_epochs, self.anneal_strategy = swa_lr, anneal_epochs, anneal_strategy
        self.scheduler: SWALR | None = None

    def _make_scheduler(self, state: FitState) -> tuple[SWALR, list[float]]:
        lrs = [g["lr"] for g in state.optimizer.param_groups]
        scheduler = SWALR(state.optimizer, swa_lr=self.swa_lr, anneal_epochs=self.anneal_epochs,
                          anneal_strategy=self.anneal_strategy)
        state.scheduler = None  # SWALR owns the learning rate from here on
        return scheduler, lrs

    def on_train_epoch_end(self, state: FitState) -> None:
        super().on_train_epoch_end(state)
        if state.epoch >= self.start:
            if self.scheduler is None:  # its constructor's step keeps the lr; the anneal starts with the next
                self.scheduler, _ = self._make_scheduler(state)
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"scheduler": None if self.scheduler is None else self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state["scheduler"] is not None:
            self.scheduler, lrs = self._make_scheduler(self.state)
            for group, lr in zip(self.state.optimizer.param_groups, lrs):  # undo the constructor's step
                group["lr"] = lr
            self.scheduler.load_state_dict(state["scheduler"])
