"""In a sweep job: report validation RMSE to the Optuna trial every epoch and stop when the pruner says so.

``train()`` plugs :class:`PruningCallback` in when the sweeper's environment variables are set
(:func:`pruning_callback_from_env`). Raising ``optuna.TrialPruned`` from the epoch hook stops the fit;
the sweeper records the trial as PRUNED, not FAIL.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import optuna

from vforge.sweeps.study import trial_from_env

try:
    from vforge.training.callbacks import Callback
except ImportError:  # a loop without the callback interface: the plain ``(epoch, metrics)`` hook still works
    Callback = object  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)


class TrialPruned(optuna.TrialPruned):
    """``optuna.TrialPruned`` that the training loop treats as a deliberate stop (MLflow status KILLED)."""

    run_status = "KILLED"


class PruningCallback(Callback):
    """Reports ``metrics[monitor]`` at each epoch to ``trial``; raises :class:`TrialPruned` when pruned.

    A loop callback (``on_epoch_end(state)`` with ``state.epoch`` and ``state.metrics``), or a plain
    ``(epoch, metrics)`` function through ``__call__``.
    """

    def __init__(self, trial: optuna.Trial, monitor: str = "val/rmse_epoch") -> None:
        self.trial = trial
        self.monitor = monitor
        self._heartbeat = getattr(trial.study._storage, "record_heartbeat", None)

    def on_epoch_end(self, state: Any) -> None:
        self(state.epoch, state.metrics)

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            raise KeyError(f"pruning monitors {self.monitor!r}, but the epoch logged only {sorted(metrics)}")
        value = float(metrics[self.monitor])
        if self._heartbeat is not None:
            self._heartbeat(self.trial._trial_id)
        if not math.isfinite(value):
            # NaN/inf: the run has diverged; no pruner can rank it, so stop it here
            self.trial.set_user_attr("pruned_epoch", epoch)
            raise TrialPruned(f"trial {self.trial.number}: {self.monitor}={value} at epoch {epoch}")
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_epoch", epoch)
            log.info("trial %d pruned at epoch %d: %s=%.4f", self.trial.number, epoch, self.monitor, value)
            raise TrialPruned(f"trial {self.trial.number} pruned at epoch {epoch} ({self.monitor}={value:.4f})")


def pruning_callback_from_env(output_dir: str | None = None) -> PruningCallback | None:
    """The callback for this job's trial, or None when the job does not run under vforge's sweeper."""
    trial = trial_from_env()
    if trial is None:
        return None
    if output_dir is not None:
        trial.set_user_attr("output_dir", str(output_dir))
    if hasattr(trial.study._storage, "record_heartbeat"):  # alive from the start, then every epoch
        trial.study._storage.record_heartbeat(trial._trial_id)
    log.info("reporting to Optuna trial %d of study %r", trial.number, trial.study.study_name)
    return PruningCallback(trial)


def sweep_callbacks(cfg: Any) -> list[PruningCallback]:
    """The callbacks a job adds when vforge's sweeper launched it (none otherwise): ``train(cfg, callbacks=...)``."""
    cb = pruning_callback_from_env(cfg.get("output_dir"))
    return [cb] if cb is not None else []
