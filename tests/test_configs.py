"""Every option of every config group composes and instantiates; typos stop at once with Hydra's message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import get_method, instantiate

from tests.conftest import CONF_DIR

GROUPS = ("model", "loss", "optimizer", "scheduler", "averaging", "trainer", "logger", "data")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml") if not p.stem.startswith("_"))


CASES = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_instantiates(make_cfg, group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and option != "synthetic":
        overrides.append("data.path=unused.csv")  # data needs a file: the data tests load real ones
    cfg = make_cfg(*overrides, tiny=group != "data" or option == "synthetic")
    node = cfg.get(group)
    if node is None:  # a "none" option turns the feature off and says so
        assert option == "none"
        return
    if group == "data":
        assert callable(get_method(node._target_))
        return
    if group == "trainer":
        assert cfg.trainer.max_epochs >= 1
        return
    model = torch.nn.Linear(3, 1)
    if group == "optimizer":
        assert isinstance(instantiate(node)(model.parameters()), torch.optim.Optimizer)
    elif group == "scheduler":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        instantiate(node)(opt, total_steps=10)
    elif group == "model":
        out = instantiate(node, n_num=3, cat_cardinalities=[], d_out=1)(torch.randn(4, 3), None)
        assert out.shape == (4, 1)
    else:
        assert instantiate(node) is not None


def test_default_data_instantiates(make_cfg):
    ds = instantiate(make_cfg().data, _convert_="all")
    assert ds.n_num == ds.train.x_num.shape[1] > 0
    assert len(ds.train) > len(ds.val) > 0 and len(ds.test) > 0


def test_misspelled_key_names_the_key(make_cfg):
    with pytest.raises(ConfigCompositionException, match=r"max_epoch"):
        make_cfg("trainer.max_epoch=3")


def test_misspelled_option_lists_the_valid_ones(make_cfg):
    with pytest.raises(ConfigCompositionException, match=r"ft_transfomer(.|\n)*Available options(.|\n)*mlp"):
        make_cfg("model=ft_transfomer")


def test_misspelled_model_argument_fails_at_instantiate(make_cfg):
    cfg = make_cfg("+model.d_blok=3")
    with pytest.raises(Exception, match=r"d_blok"):
        instantiate(cfg.model, n_num=3, cat_cardinalities=[], d_out=1)
