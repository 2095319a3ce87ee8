"""Structured configs of the sweepers: ``hydra/sweeper=optuna`` and ``hydra/sweeper=automl``.

The keys of ``optuna`` are those of the official hydra-optuna-sweeper (sampler, direction, n_trials,
n_jobs, storage, study_name, max_failure_rate, params, custom_search_space), so its configs keep
working; vforge adds ``pruner``, ``timeout`` and the heartbeat settings.
"""

# No `from __future__ import annotations` here: Hydra's plugin scan runs this module without putting it in
# sys.modules, and dataclasses then cannot resolve string annotations.
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

# --- samplers: hydra/sweeper/sampler=<name> ---


@dataclass
class TPESamplerConfig:
    """https://optuna.readthedocs.io/en/stable/reference/samplers/generated/optuna.samplers.TPESampler.html"""

    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    multivariate: bool = False
    group: bool = False
    constant_liar: bool = True  # parallel workers do not all sample the same point


@dataclass
class RandomSamplerConfig:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None


@dataclass
class CmaEsSamplerConfig:
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: int | None = None
    n_startup_trials: int = 1
    sigma0: float | None = None
    restart_strategy: str | None = None
    popsize: int | None = None
    use_separable_cma: bool = False
    with_margin: bool = False
    consider_pruned_trials: bool = False


@dataclass
class NSGAIISamplerConfig:
    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: int | None = None
    population_size: int = 50
    mutation_prob: float | None = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5


@dataclass
class GridSamplerConfig:
    """The grid is built from the choice(...)/int range(...) params; ``search_space`` overrides it."""

    _target_: str = "optuna.samplers.GridSampler"
    _partial_: bool = True  # Hydra instantiates the sweeper recursively; the grid is only known in sweep()
    seed: int | None = None
    search_space: dict[str, Any] | None = None


@dataclass
class QMCSamplerConfig:
    _target_: str = "optuna.samplers.QMCSampler"
    seed: int | None = None
    qmc_type: str = "sobol"
    scramble: bool = False


@dataclass
class GPSamplerConfig:
    _target_: str = "optuna.samplers.GPSampler"
    seed: int | None = None
    n_startup_trials: int = 10
    deterministic_objective: bool = False


# --- pruners: hydra/sweeper/pruner=<name> ---


@dataclass
class MedianPrunerConfig:
    """Stop a trial whose val RMSE at an epoch is worse than the median of earlier trials at that epoch."""

    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5
    n_warmup_steps: int = 2
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class PercentilePrunerConfig:
    _target_: str = "optuna.pruners.PercentilePruner"
    percentile: float = 25.0
    n_startup_trials: int = 5
    n_warmup_steps: int = 2
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class HyperbandPrunerConfig:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"
    reduction_factor: int = 3
    bootstrap_count: int = 0


@dataclass
class SuccessiveHalvingPrunerConfig:
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0
    bootstrap_count: int = 0


@dataclass
class ThresholdPrunerConfig:
    _target_: str = "optuna.pruners.ThresholdPruner"
    lower: float | None = None
    upper: float | None = None
    n_warmup_steps: int = 0
    interval_steps: int = 1


@dataclass
class NopPrunerConfig:
    _target_: str = "optuna.pruners.NopPruner"


# --- the sweepers ---


@dataclass
class OptunaSweeperConf:
    """``hydra/sweeper=optuna``.

    ``storage``: an Optuna RDB URL (``sqlite:///outputs/optuna/x.db``, ``postgresql://...``), a
    ``journal:///path/file.log`` JournalStorage file for many processes without a database server,
    or null for an in-memory study (nothing to resume). ``n_trials`` is the total the study should
    reach: a resumed or second sweep only runs the trials still missing. The sweep stops with an
    error once more than ``max_failure_rate * n_trials`` trials have failed.
    """

    _target_: str = "hydra_plugins.vforge_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": "median"}])
    sampler: Any = None
    pruner: Any = None
    direction: Any = "minimize"
    storage: Any = None
    study_name: str | None = None
    n_trials: int = 20
    n_jobs: int = 1
    max_failure_rate: float = 0.0
    timeout: float | None = None          # seconds; the running trial stops (pruned) and no new one starts
    # RDB storages: a trial whose job sent no heartbeat (one per epoch) for grace_period seconds is failed as stale
    # by the next sweep on the study and retried; grace_period must exceed the longest epoch
    heartbeat_interval: int | None = None
    grace_period: int | None = None
    search_space: Any = None               # the official plugin's deprecated form: rejected with a hint
    params: dict[str, str] | None = None
    custom_search_space: str | None = None
    mlflow: bool = True                    # a parent MLflow run when the app's `logger` config tracks to MLflow


@dataclass
class AutoMLSweeperConf:
    """``hydra/sweeper=automl``: one study per model on its conf/hparams_search/<model>.yaml space,
    then a leaderboard and an ensemble (see vforge/sweeps/automl.py)."""

    _target_: str = "hydra_plugins.vforge_optuna_sweeper.optuna_sweeper.AutoMLSweeper"
    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": "median"}])
    sampler: Any = None
    pruner: Any = None
    models: list[str] = field(default_factory=lambda: ["mlp", "resnet"])
    n_trials: int = 4                      # per model
    minutes: float | None = None           # in all, shared by the models; the running trial stops when spent
    n_jobs: int = 1
    storage: Any = None                    # null: sqlite file in the sweep dir
    study_name: str = "automl"
    max_failure_rate: float = 0.5
    ensemble_size: int = 3                 # the best model of up to this many families
    lightgbm: bool = True                  # a LightGBM reference row when lightgbm is installed
    latency_rows: int = 1000               # inference latency measured on this many test rows
    registered_model: str | None = None    # a name: the served pick is logged to the parent run and registered
    heartbeat_interval: int | None = None
    grace_period: int | None = None
    mlflow: bool = True


cs = ConfigStore.instance()
cs.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="vforge")
cs.store(group="hydra/sweeper", name="automl", node=AutoMLSweeperConf, provider="vforge")
for name, node in {"tpe": TPESamplerConfig, "random": RandomSamplerConfig, "cmaes": CmaEsSamplerConfig,
                   "nsgaii": NSGAIISamplerConfig, "grid": GridSamplerConfig, "qmc": QMCSamplerConfig,
                   "gp": GPSamplerConfig}.items():
    cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider="vforge")
for name, node in {"median": MedianPrunerConfig, "percentile": PercentilePrunerConfig,
                   "hyperband": HyperbandPrunerConfig, "successive_halving": SuccessiveHalvingPrunerConfig,
                   "threshold": ThresholdPrunerConfig, "nop": NopPrunerConfig}.items():
    cs.store(group="hydra/sweeper/pruner", name=name, node=node, provider="vforge")
