"""``python -m vforge.automl [overrides]``: the same as ``python -m vforge.train experiment=automl [overrides]``.

Every model in ``hydra.sweeper.models`` gets a budget of trials (or minutes) on its own search space; the
leaderboard and the ensemble land in the sweep folder (outputs/multiruns/<time>/leaderboard.md) and in MLflow.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def job(cfg: DictConfig) -> float:
    """One AutoML trial: exactly what ``vforge.train``'s main does."""
    from vforge.sweeps.pruning import sweep_callbacks
    from vforge.train import train

    metrics = train(cfg, callbacks=sweep_callbacks(cfg))
    return metrics[cfg.optimized_metric]


def main() -> None:
    if not any(a.lstrip("+").startswith("experiment=") for a in sys.argv[1:]):
        sys.argv.insert(1, "experiment=automl")
    job()


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
