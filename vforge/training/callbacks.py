"""The callback interface of the training loop, and the callbacks every run uses.

The loop (``vforge.training.loop.fit``) calls, in list order:

- ``on_fit_start(state)``: once, before the first epoch (build what you need; a resumed run then loads
  ``load_state_dict`` on top);
- ``on_step_end(state)``: after each optimizer step (``state.step`` counts them);
- ``on_train_epoch_end(state)``: after the last step of an epoch, before validation (SWA averages here);
- ``on_epoch_end(state)``: after validation; ``state.metrics`` holds the epoch's metrics. Set
  ``state.stop = True`` to stop after this epoch, or raise to abort: :class:`TrainingInterrupted` (or any
  exception marked :class:`StopsRun`, e.g. a pruned trial) ends the MLflow run as KILLED, anything
  else as FAILED, and ``train()`` re-raises it;
- ``on_fit_end(state)``: once, after the last epoch (early stopping restores the best weights here).

Callbacks with state that must survive a crash implement ``state_dict()`` / ``load_state_dict()``; the
checkpoint stores them under the callback's ``name``.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vforge.training.state import FitState

log = logging.getLogger(__name__)


class StopsRun:
    """Marks an exception that stops a run on purpose (pruning, a time budget): the run ends KILLED, not FAILED."""

    run_status = "KILLED"


class TrainingInterrupted(StopsRun, Exception):
    """Raise from a callback to stop a run on purpose (pruning, a time budget); MLflow marks it KILLED."""


def run_status(error: BaseException) -> str:
    """The MLflow status of a run that ``error`` ended: KILLED for Ctrl-C and :class:`StopsRun`, else FAILED."""
    return "KILLED" if isinstance(error, (KeyboardInterrupt, StopsRun)) else "FAILED"


class Callback:
    """Base class: every hook is a no-op; override the ones you need."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def on_fit_start(self, state: FitState) -> None: ...

    def on_step_end(self, state: FitState) -> None: ...

    def on_train_epoch_end(self, state: FitState) -> None: ...

    def on_epoch_end(self, state: FitState) -> None: ...

    def on_fit_end(self, state: FitState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class EarlyStopping(Callback):
    """Track the best ``monitor`` value (lower is better), stop after ``patience`` epochs without improvement,
    and leave the evaluated model (the averaged one when averaging is on) holding its best weights."""

    def __init__(self, monitor: str = "val/rmse_epoch", patience: int = 8) -> None:
        self.monitor, self.patience = monitor, patience
        self.best, self.best_epoch, self.bad_epochs = float("inf"), -1, 0
        self.best_state: dict[str, Any] | None = None

    def on_epoch_end(self, state: FitState) -> None:
        value = state.metrics[self.monitor]
        state.improved = value < self.best
        if state.improved:
            self.best, self.best_epoch, self.bad_epochs = value, state.epoch, 0
            self.best_state = {"eval": copy.deepcopy(state.eval_model.state_dict())}
            if state.eval_model is not state.model:
                self.best_state["raw"] = copy.deepcopy(state.model.state_dict())
        else:
            self.bad_epochs += 1
        state.best_epoch, state.best_value = self.best_epoch, self.best
        state.stop = state.stop or self.bad_epochs >= self.patience

    def on_fit_end(self, state: FitState) -> None:
        if self.bad_epochs >= self.patience:
            log.info("early stop: no %s improvement for %d epochs; best epoch %d (%.4f)", self.monitor,
                     self.patience, self.best_epoch, self.best)
        if self.best_state is not None:
            state.eval_model.load_state_dict(self.best_state["eval"])
            if "raw" in self.best_state:
                state.model.load_state_dict(self.best_state["raw"])

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]
        self.best_state = state["best_state"]


class EpochLog(Callback):
    """One log line per epoch; with a ``logger`` (``log_metrics(metrics, step)``), the epoch's metrics too."""

    def __init__(self, logger: Any = None) -> None:
        self.logger = logger

    def on_epoch_end(self, state: FitState) -> None:
        m = state.metrics
        raw = f"  (raw weights {m['val/raw_rmse_epoch']:.3f})" if "val/raw_rmse_epoch" in m else ""
        log.info("epoch %3d  train loss %.4f  val RMSE %.3f vol pts%s%s", state.epoch, m["train/loss"],
                 m["val/rmse_epoch"], raw, "  *" if state.improved else "")
        if self.logger is not None:
            self.logger.log_metrics(m, step=state.epoch)


class Progress(Callback):
    """A tqdm bar over the whole run's steps (``enabled="auto"``: only on a terminal): the epoch, the last val RMSE
    and tqdm's ETA to ``max_epochs`` (early stopping may end sooner). The bar lives during an epoch's steps only,
    so the epoch's log line never lands inside it."""

    def __init__(self, enabled: str | bool = "auto") -> None:
        self.show = sys.stderr.isatty() if enabled == "auto" else bool(enabled)
        self.bar: Any = None
        self.last = ""

    def on_step_end(self, state: FitState) -> None:
        if not self.show:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            total = state.max_epochs * state.steps_per_epoch
            self.bar = tqdm(total=total, initial=state.epoch * state.steps_per_epoch, leave=False, unit="step",
                            desc=f"epoch {state.epoch + 1}/{state.max_epochs}{self.last}")
        self.bar.update()

    def on_train_epoch_end(self, state: FitState) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_epoch_end(self, state: FitState) -> None:
        if "val/rmse_epoch" in state.metrics:
            self.last = f" (val RMSE {state.metrics['val/rmse_epoch']:.3f})"


def fit_callbacks(*, averaging: Sequence[Callback], patience: int, logger: Any, progress: str | bool,
                  checkpoint: Callback | None, extra: Sequence[Callback], user: Sequence[Callback]) -> list[Callback]:
    """Every callback of a training run, in call order, built once: averaging (its model copy is what the others
    evaluate), early stopping (which the checkpoint saves), logging, progress, the checkpoint (after the state it
    saves, before ``extra``/``user`` callbacks that may raise to stop the run after it), the configured
    ``trainer.callbacks``, then the caller's."""
    return [*averaging, EarlyStopping(patience=patience), EpochLog(logger), Progress(progress),
            *([checkpoint] if checkpoint is not None else []), *extra, *user]
