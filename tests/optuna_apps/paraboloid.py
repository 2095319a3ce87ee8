"""A paraboloid to minimize, x^2 + y^2 (optionally raising, to exercise max_failure_rate): the single-objective
app of tests/test_optuna_compat.py."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="paraboloid")
def paraboloid(cfg: DictConfig) -> float:
    if cfg.get("error", False):
        raise RuntimeError("cfg.error is True")
    return float(cfg.x) ** 2 + float(cfg.y) ** 2


if __name__ == "__main__":
    paraboloid()
