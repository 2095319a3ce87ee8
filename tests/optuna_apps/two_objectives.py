"""Binh and Korn's two-objective problem (both minimized): the multi-objective app of tests/test_optuna_compat.py."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="two_objectives")
def two_objectives(cfg: DictConfig) -> tuple[float, float]:
    x, y = float(cfg.x), float(cfg.y)
    return 4 * x * x + 4 * y * y, (x - 5) ** 2 + (y - 5) ** 2


if __name__ == "__main__":
    two_objectives()
