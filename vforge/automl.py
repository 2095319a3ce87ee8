"""``python -m vforge.automl [overrides]``: the same as ``python -m vforge.train experiment=automl [overrides]``.

Every model in ``hydra.sweeper.models`` gets a budget of trials (or minutes) on its own search space; the
leaderboard and the ensemble land in the sweep folder (outputs/multiruns/<time>/leaderboard.md) and in MLflow.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from vforge import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def job(cfg: DictConfig) -> float:
    """One AutoML trial: exactly what ``vforge.train``'s main does."""
    from vforge.sweeps.pruning import raise_if_budget_spent, sweep_callbacks
    from vforge.train import train

    callbacks = sweep_callbacks(cfg)
    metrics = train(cfg, callbacks=callbacks)
    raise_if_budget_spent(callbacks)
    return metrics[cfg.optimized_metric]


def main() -> None:
    """``vforge-automl`` / ``python -m vforge.automl``: ``job`` with ``experiment=automl`` unless one is given."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool
    if not any(a.lstrip("+").startswith("experiment=") for a in sys.argv[1:]):
        sys.argv.append("experiment=automl")  # last: argparse takes Hydra's overrides as one run of positionals
        # Tab completion (-sc query=bash) composes the words of the line it is given: complete in the AutoML config.
        line = os.environ.get("COMP_LINE")
        if line and "experiment=" not in line:
            app, _, rest = line.lstrip().partition(" ")
            os.environ["COMP_LINE"] = f"{app} experiment=automl {rest}"
    job()


if __name__ == "__main__":
    main()
