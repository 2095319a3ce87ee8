"""``trainer.n_seeds``: networks trained apart on consecutive seeds, saved and served as their average."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from vforge.models.average import SeedAverage, config
from vforge.models.mlp import MLP
from vforge.serving import ModelBundle, load_serving
from vforge.train import train

MEMBER = {"_target_": "vforge.models.mlp.MLP", "n_blocks": 1, "d_block": 8, "dropout": 0.0}


def test_the_average_is_the_members_mean_and_rebuilds_from_its_config():
    torch.manual_seed(0)
    members = [MLP(n_num=3, cat_cardinalities=[], d_out=1, n_blocks=1, d_block=8, dropout=0.0) for _ in range(3)]
    x = torch.randn(5, 3)
    average = SeedAverage.of(members).eval()
    expected = sum(m.eval()(x, None) for m in members) / 3
    torch.testing.assert_close(average(x, None), expected)
    rebuilt = instantiate(config(MEMBER, 3), n_num=3, cat_cardinalities=[], d_out=1).eval()
    rebuilt.load_state_dict(average.state_dict())
    torch.testing.assert_close(rebuilt(x, None), expected)


def test_no_members_is_refused():
    with pytest.raises(ValueError, match="n_seeds must be >= 1"):
        SeedAverage(n_num=3, cat_cardinalities=[], d_out=1, member=MEMBER, k=0)


def test_n_seeds_zero_names_the_option(make_cfg):
    with pytest.raises(ValueError, match="trainer.n_seeds must be >= 1"):
        train(make_cfg("trainer.n_seeds=0"))


def test_a_run_of_two_seeds_saves_and_scores_their_average(make_cfg):
    cfg = make_cfg("trainer.n_seeds=2", "do_no_harm.enabled=false")
    metrics = train(cfg)
    bundle = ModelBundle.load(Path(cfg.output_dir) / "model.pt")
    assert bundle.config["model"]["_target_"] == "vforge.models.average.SeedAverage"
    assert bundle.config["model"]["k"] == 2 and bundle.config["model"]["member"]["_target_"] == "vforge.models.mlp.MLP"
    serving, _ = load_serving(Path(cfg.output_dir) / "model.pt")
    members = serving.model.members
    first = [p for p in members[0].parameters()][0]
    second = [p for p in members[1].parameters()][0]
    assert not torch.equal(first, second)  # seeds 0 and 1: their own initialisation and batches

    ds = instantiate(cfg.data, _convert_="all")
    val = ds.val
    with torch.inference_mode():
        outs = [m(val.x_num, val.x_cat)[:, 0].numpy() for m in members]
    levels = [ds.to_level(o, val) for o in outs]
    mse = [float(np.mean((lv - val.iv) ** 2)) for lv in levels]
    average_level = ds.to_level((outs[0] + outs[1]) / 2, val)
    # the run scored the members' mean, not one of them
    np.testing.assert_allclose(metrics["val/rmse"], np.sqrt(np.mean((average_level - val.iv) ** 2)) * 100, rtol=1e-5)
    # and averaging can only help the squared error (Jensen): below the members' mean MSE
    assert (metrics["val/rmse"] / 100) ** 2 <= np.mean(mse) + 1e-12


def test_the_gated_average_is_served_as_it_was_scored(make_cfg):
    """With do no harm on, the saved model is the blend over the average; loading it rebuilds both, and it predicts
    the test rows as the run's predictions file has them."""
    import pandas as pd

    cfg = make_cfg("trainer.n_seeds=2", "do_no_harm.lightgbm=false")  # the blend over the average, no trees
    train(cfg)
    out = Path(cfg.output_dir)
    bundle = ModelBundle.load(out / "model.pt")
    inner = bundle.config["model"].get("model", bundle.config["model"])
    assert inner["_target_"] == "vforge.models.average.SeedAverage"
    serving, _ = load_serving(out / "model.pt")
    ds = instantiate(cfg.data, _convert_="all")
    with torch.inference_mode():
        raw = serving.model(ds.test.x_num, ds.test.x_cat)[:, 0].numpy()
    saved = pd.read_parquet(out / "predictions" / "test.parquet")
    np.testing.assert_allclose(ds.to_level(raw, ds.test), saved["model"].to_numpy(), atol=2e-6)


def test_the_average_exports_to_onnx_with_parity(make_cfg):
    from vforge.export import export

    from .test_export import export_cfg

    cfg = make_cfg("trainer.n_seeds=2", "model.d_block=32", "model.n_blocks=1")
    train(cfg)
    report = export(export_cfg(cfg.output_dir, "onnx"))
    assert report["max_abs_diff_vol_pts"] / 100 < 1e-5, report  # ONNX Runtime against the eager average
