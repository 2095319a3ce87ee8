"""A sum of squares whose z is searched near x and whose w is new to the config (custom_search_space): the
define-by-run app of tests/test_optuna_compat.py."""

import hydra
from omegaconf import DictConfig
from optuna.trial import Trial


@hydra.main(version_base="1.3", config_path="conf", config_name="conditional")
def conditional(cfg: DictConfig) -> float:
    return sum(float(cfg[k]) ** 2 for k in ("w", "x", "y", "z"))


def suggest_more(cfg: DictConfig, trial: Trial) -> None:
    """z within cfg.max_z_difference_from_x of x; w is not in the config, so its override is ``+w``."""
    x = trial.params["x"]
    trial.suggest_float("z", x - cfg.max_z_difference_from_x, x + cfg.max_z_difference_from_x)
    trial.suggest_float("+w", 0.0, 1.0)


if __name__ == "__main__":
    conditional()
