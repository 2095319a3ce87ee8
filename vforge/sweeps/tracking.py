"""The sweep's MLflow parent run: created with the client API (no active fluent run in the sweeper
process, so each job's own ``mlflow.start_run(parent_run_id=...)`` nests under it), reused on resume,
and closed with the best trial's params, metrics and Optuna plots."""

from __future__ import annotations

import logging
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from vforge.locks import file_lock
from vforge.tracking.mlflow import experiment_id, sqlite_file

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)


def tracking_from_config(config: DictConfig) -> tuple[str, str] | None:
    """(tracking_uri, experiment) when the app's ``logger`` config is vforge's MLflow logger, else None."""
    logger = config.get("logger") if isinstance(config, DictConfig) else None
    if not logger or "MLflowLogger" not in str(logger.get("_target_", "")):
        return None
    return str(logger.tracking_uri), str(logger.experiment)


class SweepRun:
    """One MLflow parent run; every method swallows and logs tracking errors (a sweep outlives its UI)."""

    def __init__(self, tracking_uri: str, experiment: str, name: str, *, run_id: str | None = None,
                 tags: dict[str, str] | None = None) -> None:
        from mlflow import MlflowClient

        with file_lock(sqlite_file(tracking_uri)):  # a fresh SQLite store is migrated once, not by two at a time
            self.client = MlflowClient(tracking_uri=tracking_uri)
            exp_id = experiment_id(self.client, experiment)
        self.tracking_uri = tracking_uri
        self.run_id = None
        if run_id:
            try:
                run = self.client.get_run(run_id)
                if run.info.experiment_id == exp_id:
                    self.run_id = run_id
                    self.client.update_run(run_id, status="RUNNING")
                    log.info("MLflow: resuming sweep parent run %s", run_id)
            except Exception:  # noqa: BLE001 - the run was deleted or lives in another store
                self.run_id = None
        if self.run_id is None:
            run = self.client.create_run(exp_id, run_name=name, tags={"vforge.sweep": "parent", **(tags or {})})
            self.run_id = run.info.run_id
            log.info("MLflow: sweep parent run %s (%s) in experiment %r at %s", self.run_id, name, experiment,
                     tracking_uri)

    def _safe(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow: %s failed: %s", getattr(fn, "__name__", fn), e)
            return None

    def log_params(self, params: dict[str, Any]) -> None:
        for k, v in params.items():
            self._safe(self.client.log_param, self.run_id, k, str(v)[:6000])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            if v is not None and v == v:
                self._safe(self.client.log_metric, self.run_id, k, float(v), step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._safe(self.client.set_tag, self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._safe(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self._safe(self.client.log_text, self.run_id, text, name)

    def child(self, trial_number: int) -> Any:
        """The child run of a trial (jobs log ``trial`` as a param), or None."""
        runs = self._safe(self.client.search_runs, [self._experiment_id()],
                          filter_string=f"tags.mlflow.parentRunId = '{self.run_id}' and params.trial = '{trial_number}'",
                          max_results=5)
        return runs[0] if runs else None

    def _experiment_id(self) -> str:
        assert self.run_id is not None, "the parent run exists from __init__ on"
        return str(self.client.get_run(self.run_id).info.experiment_id)

    def mark_child(self, trial_number: int, state: str, error: BaseException | None = None,
                   value: float | None = None) -> None:
        """Tag a trial's child run with its Optuna state (and error); a pruned run ends as KILLED."""
        run = self.child(trial_number)
        if run is None:  # the job failed before its run started (e.g. a config error): keep the error here
            if error is not None:
                text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
                self.log_text(text, f"failed_trials/trial_{trial_number}.txt")
            return
        rid = run.info.run_id
        self._safe(self.client.set_tag, rid, "optuna.trial", str(trial_number))
        self._safe(self.client.set_tag, rid, "optuna.state", state)
        if value is not None:
            self._safe(self.client.log_metric, rid, "optuna.value", float(value))
        if error is not None:
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            self._safe(self.client.set_tag, rid, "error", f"{type(error).__name__}: {error}"[:5000])
            self._safe(self.client.log_text, rid, text, "error.txt")
        if state in ("PRUNED", "STALE"):
            self._safe(self.client.set_terminated, rid, "KILLED")

    def log_study(self, study: optuna.Study, directions: list[str]) -> None:
        """Best trial's params and metrics, the trial table and Optuna plots, on the parent run."""
        import optuna

        trials = study.get_trials(deepcopy=False)
        states = [t.state.name for t in trials]
        self.log_metrics({f"trials/{s.lower()}": states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL")})
        self.log_metrics({"trials/total": len(trials)})
        with tempfile.TemporaryDirectory() as tmp:
            table = Path(tmp) / "trials.csv"
            self._safe(lambda: study.trials_dataframe().to_csv(table, index=False))
            if table.exists():
                self.log_artifact(table)
            complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
            if not complete:
                return
            if len(directions) == 1:
                best = study.best_trial
                self.log_params({f"best.{k}": v for k, v in best.params.items()})
                self.log_metrics({"best/value": float(best.values[0]), "best/trial": best.number})
                child = self.child(best.number)
                if child is not None:
                    self.log_metrics({f"best/{k}": v for k, v in child.data.metrics.items()})
                    self.set_tags({"best_run_id": child.info.run_id})
            self._plots(study, Path(tmp))

    def _plots(self, study: optuna.Study, tmp: Path) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from optuna.visualization import matplotlib as ovm
        except ImportError as e:
            log.warning("no Optuna plots: %s", e)
            return
        plots: dict[str, Callable[..., Any]] = {"optimization_history": ovm.plot_optimization_history,
                 "param_importances": ovm.plot_param_importances,
                 "intermediate_values": ovm.plot_intermediate_values}
        for name, fn in plots.items():
            try:
                ax = fn(study)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
                fig.set_size_inches(8, 5)
                fig.tight_layout()
                path = tmp / f"{name}.png"
                fig.savefig(path, dpi=100)
                plt.close(fig)
                self.log_artifact(path, "optuna")
            except Exception as e:  # noqa: BLE001 - e.g. importances need 2+ complete trials
                log.info("Optuna plot %s skipped: %s", name, e)

    def log_chain_model(self, checkpoint: str | Path, registered_model: str | None = None) -> str | None:
        """Log ``checkpoint`` as this run's pyfunc model ``chain_model`` (``vforge.tracking.registry``), registered
        under ``registered_model`` when named; its model URI (None when tracking failed)."""
        import mlflow

        from vforge.tracking.registry import log_chain_model

        run_id = self.run_id
        assert run_id is not None

        def log_it() -> str:
            mlflow.set_tracking_uri(self.tracking_uri)
            with mlflow.start_run(run_id=run_id):
                uri = log_chain_model(checkpoint, registered_model)
            self.client.update_run(run_id, status="RUNNING")  # the parent ends when the sweep does
            return uri

        return self._safe(log_it)

    def end(self, status: str = "FINISHED") -> None:
        self._safe(self.client.set_terminated, self.run_id, status)
