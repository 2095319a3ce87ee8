"""Every model has a search space; every searched key exists in the composed config (a renamed
hyperparameter fails here), and models built from sampled points of the space run forward."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vforge.sweeps.search_space import parse_params

from .conftest import CONF_DIR

MODELS = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))
SPACES = sorted(p.stem for p in (Path(CONF_DIR) / "hparams_search").glob("*.yaml"))
_MISSING = object()


def test_every_model_has_a_search_space_and_every_space_a_model():
    missing = [m for m in MODELS if m not in SPACES]
    assert not missing, f"no conf/hparams_search/<model>.yaml for: {', '.join(missing)}"
    orphans = [s for s in SPACES if s not in MODELS]
    assert not orphans, f"search spaces without conf/model/<name>.yaml: {', '.join(orphans)}"


def compose_search(name: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[f"hparams_search={name}"], return_hydra_config=True)


@pytest.mark.parametrize("name", SPACES)
def test_search_space_selects_its_model_and_names_existing_keys(name):
    cfg = compose_search(name)
    model_yaml = OmegaConf.load(Path(CONF_DIR) / "model" / f"{name}.yaml")
    assert cfg.model._target_ == model_yaml._target_, "the search space must select its own model"
    assert cfg.hydra.mode.name == "MULTIRUN"
    sw = cfg.hydra.sweeper
    assert sw._target_.endswith("OptunaSweeper") and sw.study_name == name
    assert sw.direction == "minimize" and cfg.optimized_metric == "val/rmse"
    assert 10 <= sw.n_trials <= 200
    space, fixed, other = parse_params(OmegaConf.to_container(sw.params))
    assert len(space) >= 3 and not other
    for key in [*space, *fixed]:
        assert not key.startswith(("+", "~")), f"{key}: search only keys the model YAML already has"
        assert OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING, (
            f"conf/hparams_search/{name}.yaml searches {key}, which is not in the composed config "
            f"(renamed in conf/model/{name}.yaml?)")
    closed_form = model_yaml._target_ == "vforge.models.linear.Ridge"  # solved, not trained: no learning rate
    assert any(k.startswith("model.") for k in space) and ("optimizer.lr" in space or closed_form)


@pytest.mark.parametrize("name", SPACES)
def test_sampled_points_of_the_space_build_models_that_run(name):
    cfg = compose_search(name)
    space, fixed, _ = parse_params(OmegaConf.to_container(cfg.hydra.sweeper.params))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    torch.manual_seed(0)
    for _ in range(3):
        trial = study.ask(space)
        point = cfg.copy()
        for key, value in {**trial.params, **fixed}.items():
            OmegaConf.update(point, key, value, merge=False)
        model = instantiate(point.model, n_num=11, cat_cardinalities=[], d_out=1, _convert_="all")
        with torch.no_grad():
            out = model.eval()(torch.randn(4, 11), None)
        assert out.shape == (4, 1) and torch.isfinite(out).all(), f"{name} at {trial.params}"
        study.tell(trial, 0.0)
