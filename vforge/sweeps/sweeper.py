"""The sweepers' logic: an ask/tell loop over a database-backed Optuna study, jobs through Hydra's launcher.

hydra_plugins/vforge_optuna_sweeper/ holds only the classes Hydra discovers; they import this module.

Each job gets its trial through ``hydra.job.env_set`` (storage URL, study name, trial id, pruner):
the job rebuilds the trial, reports val RMSE every epoch and raises ``optuna.TrialPruned`` when the
pruner says so; that exception comes back in the job's return and the trial is told PRUNED.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState

from vforge.sweeps import study as S
from vforge.sweeps.console import SweepProgress, format_duration, trial_line
from vforge.sweeps.pruning import ATTR_PRUNED_EPOCH, ATTR_PRUNED_REASON, BUDGET_SPENT, ENV_DEADLINE
from vforge.sweeps.search_space import format_value, grid_search_space, parse_params, quote, suggest
from vforge.tracking.mlflow import ENV_PARENT_RUN

if TYPE_CHECKING:
    from vforge.sweeps.tracking import SweepRun

log = logging.getLogger(__name__)
# Hydra's launchers log every job's full override list; the sweeper's one line per trial says it shorter
LAUNCHER_LOGGERS = ("hydra._internal.core_plugins.basic_launcher", "hydra_plugins.hydra_joblib_launcher._core")
# What a sweep's best val metric is compared with at the end, on the same rows (metrics.json of its run)
BENCHMARKS = {"val/rmse": ("val/baseline_rmse", "the baseline (persistence, else the previous surface)"),
              "val/prev_quoted_rmse": ("val/persistence_rmse", "persistence")}
BEAT_MARGIN = 0.01  # a best trial less than 1% better than its benchmark is reported as not beating it
# our jobs send the heartbeats (one per epoch, vforge/sweeps/pruning.py), so ask/tell with a heartbeat is intended
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


# Overrides that change how a trial runs or is logged, not what it measures: a study may be continued with others.
NOT_THE_QUESTION = ("logger", "trainer.num_threads", "trainer.progress", "trainer.device", "trainer.resume",
                    "trainer.compile", "trainer.checkpoint")


def _directions(direction: Any) -> list[str]:
    items = list(direction) if isinstance(direction, Sequence) and not isinstance(direction, str) else [direction]
    out = [str(getattr(d, "name", d)).lower() for d in items]
    for d in out:
        if d not in ("minimize", "maximize"):
            raise ValueError(f"hydra.sweeper.direction must be minimize or maximize (or a list of them), got {d!r}")
    return out


def _values(ret: JobReturn, n_objectives: int) -> list[float]:
    value = ret.return_value
    try:
        values = [float(value)] if n_objectives == 1 else [float(v) for v in value]
    except (TypeError, ValueError) as e:
        raise ValueError(f"the job must return {'a float' if n_objectives == 1 else 'a list of floats'}, "
                         f"got {value!r}") from e
    if len(values) != n_objectives:
        raise ValueError(f"the job returned {len(values)} values for {n_objectives} directions")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"the job returned a non-finite objective {values}")
    return values


def _plain(cfg: Any) -> dict[str, Any]:
    """A config node (DictConfig or mapping; None: empty) as a plain dict."""
    if isinstance(cfg, DictConfig):
        return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    return dict(cfg or {})


def _tell(study: optuna.Study, trial: optuna.Trial, values: list[float] | None, state: TrialState) -> None:
    try:
        study.tell(trial, values=values, state=state)
    except RuntimeError as e:
        # the grid sampler calls study.stop() once the grid is done, which ask/tell does not allow; the trial
        # is already recorded by then
        if "Study.stop" not in str(e):
            raise


def finished_value(trial: optuna.trial.FrozenTrial) -> float | None:
    """The val RMSE a finished run wrote to its metrics.json (None when it wrote none)."""
    try:
        return float(json.loads((Path(trial.user_attrs["output_dir"]) / "metrics.json").read_text())["val/rmse"])
    except (KeyError, OSError, ValueError):
        return None


class StudySweeper(Sweeper):
    """What the Optuna and AutoML sweepers share: setup, the study, the ask/tell loop, MLflow."""

    def __init__(self, *, sampler: Any, pruner: Any, n_jobs: int, max_failure_rate: float,
                 heartbeat_interval: int | None, grace_period: int | None, mlflow: bool) -> None:
        if not 0.0 <= max_failure_rate <= 1.0:
            raise ValueError(f"hydra.sweeper.max_failure_rate must be in [0, 1], got {max_failure_rate}")
        if n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_jobs must be >= 1, got {n_jobs}")
        self.sampler_cfg = sampler
        self.pruner_cfg = pruner
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.use_mlflow = mlflow
        self.job_idx = 0
        self.config: DictConfig | None = None
        self.parent: SweepRun | None = None
        self.deadline: float | None = None  # unix time: the running trial stops then (hydra.sweeper.minutes/timeout)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)
        if launcher is None:
            raise RuntimeError(f"Hydra found no launcher for hydra/launcher={config.hydra.launcher}")
        self.launcher = launcher
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        # Hydra hands __init__ the sampler and pruner already instantiated; jobs need the pruner's config
        # (a pruner is not kept in the storage), so take both from the config
        node = config.hydra.sweeper
        self.sampler_cfg = node.get("sampler", self.sampler_cfg)
        self.pruner_cfg = node.get("pruner", self.pruner_cfg)
        for name in LAUNCHER_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)

    # --- building blocks ---

    def _sampler(self, space: dict[str, BaseDistribution]) -> optuna.samplers.BaseSampler | None:
        cfg = self.sampler_cfg
        if cfg is None or isinstance(cfg, optuna.samplers.BaseSampler):
            return cfg
        cfg = _plain(cfg)
        if str(cfg.get("_target_", "")).endswith("GridSampler"):
            cfg.pop("_partial_", None)
            grid = cfg.pop("search_space", None) or grid_search_space(space)
            return instantiate(cfg, search_space=grid)
        return instantiate(cfg)

    def _pruner(self) -> tuple[optuna.pruners.BasePruner | None, dict | None]:
        cfg = self.pruner_cfg
        if cfg is None:
            return None, None
        if isinstance(cfg, optuna.pruners.BasePruner):
            log.warning("pruner %s given as an object: jobs cannot rebuild it, so they will not be pruned; "
                        "give it as a config (_target_: ...)", type(cfg).__name__)
            return cfg, None
        plain = _plain(cfg)
        return instantiate(plain), plain

    def _open_study(self, storage: str | None, study_name: str, directions: list[str],
                    space: dict[str, BaseDistribution]) -> optuna.Study:
        if storage is not None and not isinstance(storage, str):
            raise ValueError(f"hydra.sweeper.storage must be a URL string (sqlite:///..., postgresql://..., "
                             f"journal:///path.log) or null, got {storage!r}")
        self.storage_url = storage or self._fresh_storage()
        pruner, self.pruner_plain = self._pruner()
        study = S.create_study(self.storage_url, study_name, directions, sampler=self._sampler(space), pruner=pruner,
                               heartbeat_interval=self.heartbeat_interval, grace_period=self.grace_period)
        with S.storage_lock(self.storage_url):  # two workers starting together fail a trial once
            stale = S.fail_stale_trials(study)
        if stale and self.parent is not None:
            for n in stale:
                self.parent.mark_child(n, "STALE")
        return study

    def _fresh_storage(self) -> str:
        """``storage: null``: a fresh study, as the official plugin's in-memory one, kept in a new SQLite file in
        the sweep folder (jobs in other processes must reach their trial to report and be pruned)."""
        if getattr(self, "_fresh_url", None) is None:
            folder, n = self.sweep_dir.resolve(), 0
            path = folder / "optuna.db"
            while path.exists():  # a reused sweep folder: still a new study
                n += 1
                path = folder / f"optuna-{n}.db"
            self._fresh_url = f"sqlite:///{path}"
            log.info("storage null: a fresh study in %s (to resume a study later, give hydra.sweeper.storage=<url> "
                     "and hydra.sweeper.study_name)", path)
        return self._fresh_url

    def _made_for(self, space: dict[str, BaseDistribution], fixed: list[str]) -> dict[str, Any]:
        """What a study answers: the app's data and optimized metric, the directions, the space, the fixed overrides."""
        fixed = [o for o in fixed if not o.lstrip("+~").startswith(NOT_THE_QUESTION)]
        made: dict[str, Any] = {"space": {k: str(v) for k, v in sorted(space.items())}, "fixed": sorted(fixed),
                                "directions": list(getattr(self, "directions", []))}
        for key in ("data", "optimized_metric"):
            if self.config is not None and key in self.config:
                try:
                    value = OmegaConf.to_container(self.config[key], resolve=True) if isinstance(
                        self.config[key], DictConfig) else self.config[key]
                except Exception:  # noqa: BLE001 - an interpolation only a job can resolve: keep it as written
                    value = OmegaConf.to_container(self.config[key], resolve=False)
                if isinstance(value, dict):
                    value.pop("cache_dir", None)  # where generated data is cached, not what it is
                made[key] = value
        return made

    def _start_parent(self, study: optuna.Study, name: str, params: dict[str, Any]) -> None:
        from vforge.sweeps.tracking import SweepRun, tracking_from_config

        where = tracking_from_config(self.config) if self.use_mlflow and self.config is not None else None
        if where is None:
            return
        uri, experiment = where
        key = f"vforge:mlflow_parent:{uri}:{experiment}"
        # one parent per study: a resumed sweep and a second worker on the same study reuse it
        with S.storage_lock(self.storage_url):
            parent = SweepRun(uri, experiment, name, run_id=study.user_attrs.get(key),
                              tags={"optuna.study": study.study_name, "optuna.storage": self.storage_url})
            study.set_user_attr(key, parent.run_id)
        parent.log_params(params)
        self.parent = parent

    def _job_overrides(self, trial: optuna.Trial, study: optuna.Study, fixed_overrides: list[str]) -> list[str]:
        env = S.job_env(self.storage_url, study.study_name, trial, self.pruner_plain)
        if self.parent is not None and self.parent.run_id is not None:
            env[ENV_PARENT_RUN] = self.parent.run_id
        if self.deadline is not None:
            env[ENV_DEADLINE] = f"{self.deadline:.3f}"
        out = [f"{k}={format_value(v)}" for k, v in trial.params.items()]
        out += fixed_overrides
        if self.config is not None and "trial" in self.config:
            out.append(f"trial={trial.number}")
        out += [f"++hydra.job.env_set.{k}={quote(v)}" for k, v in env.items()]
        return out

    def _outcome(self, ret: JobReturn, n_objectives: int) -> tuple[TrialState, list[float] | None, BaseException | None]:
        if ret.status == JobStatus.FAILED:
            # the job's exception (JobReturn.return_value would re-raise it and print a scary banner)
            err = ret._return_value
            if isinstance(err, optuna.TrialPruned):
                return TrialState.PRUNED, None, None
            return TrialState.FAIL, None, err
        try:
            return TrialState.COMPLETE, _values(ret, n_objectives), None
        except Exception as e:  # noqa: BLE001
            return TrialState.FAIL, None, e

    def run_study(self, study: optuna.Study, *, space: dict[str, BaseDistribution], fixed: list[str],
                  n_trials: int, timeout: float | None, custom_search_space: str | None = None,
                  label: str = "") -> list[tuple[int, TrialState]]:
        """Ask, launch and tell until the study holds ``n_trials`` counted trials, or ``timeout`` s pass: then the
        running trial stops too (recorded as pruned)."""
        extender = get_method(custom_search_space) if custom_search_space else None
        self.deadline = time.time() + timeout if timeout is not None else None
        n_before = S.n_counted(study)
        progress = SweepProgress(n_trials - n_before if n_trials < 10**9 else None, label=label, seconds=timeout)
        done: list[tuple[int, TrialState]] = []
        try:
            self._ask_launch_tell(study, space, fixed, n_trials, extender, progress, done, label)
        finally:
            progress.close()
            self.deadline = None
        return done

    def _ask_launch_tell(self, study: optuna.Study, space: dict[str, BaseDistribution], fixed: list[str],
                         n_trials: int, extender: Any, progress: SweepProgress, done: list[tuple[int, TrialState]],
                         label: str) -> None:
        n_objectives = len(study.directions)
        n_failed, last_err = 0, None
        while True:
            with S.storage_lock(self.storage_url):  # count and ask as one step, so parallel sweeps never overshoot
                left = n_trials - S.n_counted(study)
                if left <= 0:
                    break
                if self.deadline is not None and time.time() > self.deadline:
                    log.info("%stime budget of %s spent with %d trials to go", label,
                             format_duration(progress.budget or 0), left)
                    break
                trials = [study.ask() for _ in range(min(left, self.n_jobs))]
                for t in trials:
                    S.claim(t)
            batch = []
            for trial in trials:
                for name, dist in space.items():
                    suggest(trial, name, dist)
                if extender is not None:
                    extender(self.config, trial)
                batch.append(self._job_overrides(trial, study, fixed))
            try:
                self.validate_batch_is_legal(batch)
            except Exception as e:
                for trial in trials:
                    trial.set_user_attr(S.ATTR_ERROR, f"{type(e).__name__}: {e}"[:2000])
                    study.tell(trial, state=TrialState.FAIL)
                raise
            launched = time.monotonic()
            if self.launcher is None:
                raise RuntimeError("the sweeper runs trials only after Hydra's setup() gave it a launcher")
            returns = self.launcher.launch(batch, initial_job_idx=self.job_idx)
            per_trial = (time.monotonic() - launched) / max(len(returns), 1)  # n_jobs at once share the wall time
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns):
                state, values, err = self._outcome(ret, n_objectives)
                if err is not None:
                    trial.set_user_attr(S.ATTR_ERROR, f"{type(err).__name__}: {err}"[:2000])
                _tell(study, trial, values, state)
                done.append((trial.number, state))
                if self.parent is not None:
                    self.parent.mark_child(trial.number, state.name, err, values[0] if values else None)
                with S.storage_lock(self.storage_url):
                    left = max(n_trials - S.n_counted(study), 0) if n_trials < 10**9 else 10**9  # 10**9: no cap
                eta = progress.trial_done(per_trial, left + sum(1 for t in trials if t.number > trial.number))
                self._log_trial(study, trial, state, values, err, label, progress, eta)
                if state == TrialState.FAIL:
                    n_failed, last_err = n_failed + 1, err
            if n_failed > self.max_failure_rate * n_trials:  # after the whole batch is told: no trial left RUNNING
                raise RuntimeError(
                    f"{label}{n_failed} trial(s) failed, more than max_failure_rate={self.max_failure_rate} "
                    f"x n_trials={n_trials}; last error: {type(last_err).__name__}: {last_err}. Raise "
                    "hydra.sweeper.max_failure_rate to let the study go on") from last_err

    def _log_trial(self, study: optuna.Study, trial: optuna.Trial, state: TrialState, values: list[float] | None,
                   err: BaseException | None, label: str, progress: SweepProgress, eta: float | None) -> None:
        """One line: the trial, its params, its val metric (or where it was pruned, or its error), the best so far,
        and the sweep's progress with an ETA."""
        frozen = study._storage.get_trial(trial._trial_id)
        value, epoch, reason = (values[0] if values else None), None, ""
        if state == TrialState.PRUNED:
            epoch = frozen.user_attrs.get(ATTR_PRUNED_EPOCH, frozen.last_step)
            last = frozen.last_step
            value = frozen.intermediate_values.get(last) if last is not None else None
            reason = str(frozen.user_attrs.get(ATTR_PRUNED_REASON, ""))
            if reason == BUDGET_SPENT:  # its run finished (best epoch restored): what it scored
                value = finished_value(frozen) or value
        elif state == TrialState.FAIL:
            reason = f"{type(err).__name__}: {err}"
        best = None
        if len(study.directions) == 1:
            try:
                best = (study.best_trial.number, float(study.best_value))
            except ValueError:  # no complete trial yet
                best = None
        metric = str(self.config.get("optimized_metric", "val/rmse")) if self.config is not None else "val/rmse"
        line = trial_line(trial.number, state.name, trial.params, value, epoch=epoch, reason=reason, best=best,
                          metric="val RMSE" if metric == "val/rmse" else metric,
                          done=len(progress.durations), total=progress.total, elapsed=progress.elapsed, eta=eta)
        progress.write(log, logging.WARNING if state == TrialState.FAIL else logging.INFO, label + line)

    def compare_with_benchmark(self, study: optuna.Study) -> tuple[str, bool] | None:
        """Whether the best trial beats what a desk has without a model on the same validation rows, by
        ``BEAT_MARGIN``: ``(a line that says so, whether it does)``; None when that cannot be said (no complete
        trial, no metrics.json, an objective with no benchmark)."""
        metric = str(self.config.get("optimized_metric", "")) if self.config is not None else ""
        if metric not in BENCHMARKS or len(study.directions) != 1:
            return None
        try:
            best = study.best_trial
        except ValueError:
            return None
        key, name = BENCHMARKS[metric]
        try:
            metrics = json.loads((Path(best.user_attrs["output_dir"]) / "metrics.json").read_text())
            bench = float(metrics[key])
        except (KeyError, OSError, ValueError):
            return None
        value = float(cast(float, best.value))
        gain = 1 - value / bench if bench > 0 else float("nan")
        text = f"best {metric} {value:.4f} vs {bench:.4f} for {name} on the same rows ({gain:+.1%})"
        if not gain >= BEAT_MARGIN:
            text += (f": the best trial does not beat it by {BEAT_MARGIN:.0%}; more trials or epochs, a wider space, "
                     "or keep persistence")
        return text, gain >= BEAT_MARGIN


class OptunaSweeperImpl(StudySweeper):
    def __init__(self, *, sampler: Any, pruner: Any, direction: Any, storage: Any, study_name: str | None,
                 n_trials: int, n_jobs: int, max_failure_rate: float, timeout: float | None,
                 heartbeat_interval: int | None, grace_period: int | None, search_space: Any,
                 params: Any, custom_search_space: str | None, mlflow: bool) -> None:
        super().__init__(sampler=sampler, pruner=pruner, n_jobs=n_jobs, max_failure_rate=max_failure_rate,
                         heartbeat_interval=heartbeat_interval, grace_period=grace_period, mlflow=mlflow)
        if search_space:
            raise ValueError("hydra.sweeper.search_space (deprecated in the official plugin) is not supported; "
                             "write the same space as hydra.sweeper.params, e.g. model.d_block: choice(64, 128)")
        if n_trials < 1:
            raise ValueError(f"hydra.sweeper.n_trials must be >= 1, got {n_trials}")
        self.directions = _directions(direction)
        self.storage = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.timeout = timeout
        self.params = params
        self.custom_search_space = custom_search_space

    def sweep(self, arguments: list[str]) -> list[tuple[int, TrialState]]:
        params = _plain(self.params)
        space, fixed_values, other = parse_params(params, arguments)
        fixed = [f"{k}={v}" for k, v in fixed_values.items()] + other
        study_name = self.study_name or "sweep"
        study = self._open_study(self.storage, study_name, self.directions, space)
        S.check_made_for(study, self._made_for(space, fixed), self.storage_url)
        if isinstance(study.sampler, optuna.samplers.GridSampler):
            n_grid = math.prod(len(v) for v in study.sampler._search_space.values())
            if n_grid < self.n_trials:
                log.info("the grid has %d points: n_trials %d -> %d", n_grid, self.n_trials, n_grid)
                self.n_trials = n_grid
        n_before = S.n_counted(study)
        log.info("study %r in %s: %d of %d trials already done, running or queued; sampler %s, pruner %s, %d job(s) "
                 "at a time",
                 study.study_name, self.storage_url, n_before, self.n_trials, type(study.sampler).__name__,
                 type(study.pruner).__name__, self.n_jobs)
        self._start_parent(study, f"sweep-{study.study_name}", {
            "study_name": study.study_name, "storage": self.storage_url, "n_trials": self.n_trials,
            "directions": ",".join(self.directions), "sampler": type(study.sampler).__name__,
            "pruner": type(study.pruner).__name__, **{f"space.{k}": v for k, v in params.items()}})
        status = "FAILED"
        try:
            done = self.run_study(study, space=space, fixed=fixed, n_trials=self.n_trials, timeout=self.timeout,
                                  custom_search_space=self.custom_search_space)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self._finish(study, status)
        return done

    def _finish(self, study: optuna.Study, status: str) -> None:
        trials = study.get_trials(deepcopy=False)
        counts = {s.name: sum(t.state == s and S.counted(t) for t in trials) for s in TrialState}
        # the official plugin's keys (name: optuna, best_params, best_value; solutions when multi-objective) first
        summary: dict[str, Any] = {"name": "optuna", "study_name": study.study_name, "storage": self.storage_url,
                                   "trials": {k: v for k, v in counts.items() if v}}
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if complete and len(self.directions) == 1:
            summary |= {"best_trial": study.best_trial.number, "best_value": study.best_value,
                        "best_params": study.best_params}
            verdict = self.compare_with_benchmark(study)
            if verdict is not None:
                summary["benchmark"], beats = verdict
        elif complete:
            summary["solutions"] = [{"number": t.number, "params": t.params, "values": t.values}
                                    for t in study.best_trials]
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(summary), self.sweep_dir / "optimization_results.yaml")
        log.info("study %r: %s", study.study_name, ", ".join(f"{v} {k.lower()}" for k, v in summary["trials"].items()))
        if "best_value" in summary:
            log.info("best trial %d: %s=%.4f with %s", summary["best_trial"], self.directions[0],
                     summary["best_value"], summary["best_params"])
        if "benchmark" in summary:
            log.log(logging.INFO if beats else logging.WARNING, "%s", summary["benchmark"])
        if self.parent is not None:
            self.parent.log_study(study, self.directions)
            self.parent.log_artifact(self.sweep_dir / "optimization_results.yaml")
            self.parent.end(status)
