"""The plugin classes Hydra discovers; the logic lives in vforge/sweeps/ (imported only when a sweep runs)."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from .config import AutoMLSweeperConf, OptunaSweeperConf  # noqa: F401 - registers the configs


class OptunaSweeper(Sweeper):
    """``hydra/sweeper=optuna``: an Optuna study with pruning, database storage, resume and MLflow parent runs."""

    def __init__(self, **kwargs: Any) -> None:
        from vforge.sweeps.sweeper import OptunaSweeperImpl

        self.sweeper = OptunaSweeperImpl(**kwargs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.sweeper.sweep(arguments)


class AutoMLSweeper(Sweeper):
    """``hydra/sweeper=automl``: a budget of trials per model, then a leaderboard and an ensemble."""

    def __init__(self, **kwargs: Any) -> None:
        from vforge.sweeps.automl import AutoMLSweeperImpl

        self.sweeper = AutoMLSweeperImpl(**kwargs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.sweeper.sweep(arguments)
