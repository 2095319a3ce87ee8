"""In a sweep job: report validation RMSE to the Optuna trial every epoch and stop when the pruner says so.

``train()`` plugs :class:`PruningCallback` in when the sweeper's environment variables are set
(:func:`pruning_callback_from_env`). Raising ``optuna.TrialPruned`` from the epoch hook stops the fit;
the sweeper records the trial as PRUNED, not FAIL.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import optuna

from vforge.sweeps.study import trial_from_env

try:
    from vforge.training.callbacks import Callback, StopsRun
except ImportError:  # a loop without the callback interface: the plain ``(epoch, metrics)`` hook still works
    Callback = object  # type: ignore[misc,assignment]

    class StopsRun:  # type: ignore[no-redef]
        run_status = "KILLED"

log = logging.getLogger(__name__)
# Unix time at which the sweep's time budget (hydra.sweeper.minutes / timeout) is spent: the running trial stops then
ENV_DEADLINE = "VFORGE_SWEEP_DEADLINE"
# trial user attributes: the epoch a trial stopped at, and why when not the pruner ("time budget spent", a NaN)
ATTR_PRUNED_EPOCH, ATTR_PRUNED_REASON = "pruned_epoch", "pruned_reason"
BUDGET_SPENT = "time budget spent"


class TrialPruned(StopsRun, optuna.TrialPruned):
    """``optuna.TrialPruned`` that the training loop treats as a deliberate stop (MLflow status KILLED)."""


class PruningCallback(Callback):
    """Reports ``metrics[monitor]`` at each epoch to ``trial``; raises :class:`TrialPruned` when pruned.

    A loop callback (``on_epoch_end(state)`` with ``state.epoch`` and ``state.metrics``), or a plain
    ``(epoch, metrics)`` function through ``__call__``.
    """

    def __init__(self, trial: optuna.Trial, monitor: str = "val/rmse_epoch", deadline: float | None = None) -> None:
        self.trial = trial
        self.monitor = monitor
        self.deadline = deadline
        self._heartbeat = getattr(trial.study._storage, "record_heartbeat", None)

    budget_spent = False  # set at the epoch end after the deadline: the fit stops there, like early stopping

    def on_epoch_end(self, state: Any) -> None:
        self(state.epoch, state.metrics)
        if self.deadline is not None and time.time() > self.deadline:
            # the run ends as a finished run (evaluated, saved: AutoML can rank it), then the job reports the trial
            # as pruned (raise_if_budget_spent), so Optuna never takes a cut-short curve for a complete trial
            self.budget_spent, state.stop = True, True
            self.trial.set_user_attr(ATTR_PRUNED_EPOCH, state.epoch)
            self.trial.set_user_attr(ATTR_PRUNED_REASON, BUDGET_SPENT)
            log.info("trial %d stops after epoch %d: the sweep's time budget is spent", self.trial.number, state.epoch)

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            raise KeyError(f"pruning monitors {self.monitor!r}, but the epoch logged only {sorted(metrics)}")
        value = float(metrics[self.monitor])
        if self._heartbeat is not None:
            self._heartbeat(self.trial._trial_id)
        if not math.isfinite(value):
            # NaN/inf: the run has diverged; no pruner can rank it, so stop it here
            self.trial.set_user_attr(ATTR_PRUNED_EPOCH, epoch)
            self.trial.set_user_attr(ATTR_PRUNED_REASON, f"{self.monitor}={value}")
            raise TrialPruned(f"trial {self.trial.number}: {self.monitor}={value} at epoch {epoch}")
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            self.trial.set_user_attr(ATTR_PRUNED_EPOCH, epoch)
            log.info("trial %d pruned at epoch %d: %s=%.4f", self.trial.number, epoch, self.monitor, value)
            raise TrialPruned(f"trial {self.trial.number} pruned at epoch {epoch} ({self.monitor}={value:.4f})")


def pruning_callback_from_env(output_dir: str | None = None) -> PruningCallback | None:
    """The callback for this job's trial, or None when the job does not run under vforge's sweeper."""
    trial = trial_from_env()
    if trial is None:
        return None
    deadline = float(os.environ[ENV_DEADLINE]) if os.environ.get(ENV_DEADLINE) else None
    if output_dir is not None:
        trial.set_user_attr("output_dir", str(output_dir))
    if hasattr(trial.study._storage, "record_heartbeat"):  # alive from the start, then every epoch
        trial.study._storage.record_heartbeat(trial._trial_id)
    log.debug("reporting to Optuna trial %d of study %r", trial.number, trial.study.study_name)
    return PruningCallback(trial, deadline=deadline)


def sweep_callbacks(cfg: Any) -> list[PruningCallback]:
    """The callbacks a job adds when vforge's sweeper launched it (none otherwise): ``train(cfg, callbacks=...)``."""
    cb = pruning_callback_from_env(cfg.get("output_dir"))
    if cb is None:
        return []
    from hydra.core.hydra_config import HydraConfig

    from vforge.sweeps.console import quiet_job_console

    # the job's console shows warnings only, and the data report in the sweep's first job; its log file has it all
    quiet_job_console(first=HydraConfig.initialized() and HydraConfig.get().job.num == 0)
    return [cb]


def raise_if_budget_spent(callbacks: list[PruningCallback]) -> None:
    """After ``train()``: a trial the time budget cut short ends as pruned (its run is finished and saved)."""
    for cb in callbacks:
        if cb.budget_spent:
            raise TrialPruned(f"trial {cb.trial.number}: stopped after epoch "
                              f"{cb.trial.user_attrs.get(ATTR_PRUNED_EPOCH, '?')}, the sweep's time budget is spent")
