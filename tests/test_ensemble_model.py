"""AutoML's ensemble as one model: LightGBM's trees evaluated in torch, the convex combination by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vforge.models.ensemble import Ensemble, Trees, tree_arrays, tree_depth

MEMBER = {"_target_": "vforge.models.mlp.MLP", "n_blocks": 1, "d_block": 8, "dropout": 0.0}


def booster(seed: int = 0):
    lgb = pytest.importorskip("lightgbm")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1500, 4))
    y = 2 * x[:, 0] + np.sin(3 * x[:, 1]) + 0.1 * rng.standard_normal(1500)
    return lgb.train({"verbosity": -1, "num_leaves": 15, "seed": seed, "deterministic": True},
                     lgb.Dataset(x, y), 60), x


def test_trees_in_torch_predict_what_lightgbm_predicts():
    b, x = booster()
    arrays = tree_arrays(b, 40)
    trees = Trees.of(arrays)
    assert len(arrays["roots"]) == 40 and 1 <= trees.depth <= 14  # 15 leaves: at most 14 splits deep
    got = trees(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(got, b.predict(x, num_iteration=40), atol=1e-9)


def test_a_single_leaf_tree_is_its_value():
    arrays = {"feature": np.zeros(1, np.int64), "threshold": np.zeros(1), "left": np.zeros(1, np.int64),
              "right": np.zeros(1, np.int64), "value": np.array([0.25]), "roots": np.zeros(1, np.int64)}
    assert tree_depth(arrays) == 0
    assert Trees.of(arrays)(torch.zeros(3, 2)).tolist() == [0.25, 0.25, 0.25]


def test_the_ensemble_is_the_weighted_sum_of_its_parts():
    b, x = booster(1)
    arrays = tree_arrays(b)
    size = {"n_nodes": len(arrays["feature"]), "n_trees": len(arrays["roots"]), "depth": tree_depth(arrays)}
    torch.manual_seed(0)
    ens = Ensemble(n_num=4, cat_cardinalities=[], d_out=1, members=[MEMBER, MEMBER], weights=[0.5, 0.2],
                   trees=size, weight_trees=0.2, weight_zero=0.1, zero=-0.3)
    ens.trees = Trees.of(arrays)
    ens.eval()
    xt = torch.as_tensor(x[:50], dtype=torch.float32)
    with torch.inference_mode():
        by_hand = (0.5 * ens.members[0](xt, None)[:, 0] + 0.2 * ens.members[1](xt, None)[:, 0]
                   + 0.2 * torch.as_tensor(b.predict(x[:50]), dtype=torch.float32) + 0.1 * -0.3)
        torch.testing.assert_close(ens(xt, None)[:, 0], by_hand, atol=1e-5, rtol=1e-5)


def test_an_ensemble_refuses_weights_that_do_not_match_its_members():
    with pytest.raises(ValueError, match="a weight per member"):
        Ensemble(n_num=4, cat_cardinalities=[], d_out=1, members=[MEMBER], weights=[0.5, 0.5])


def test_a_saved_ensemble_re_marks_raw_rows_as_its_leaderboard_row_scored(make_cfg, tmp_path):
    """A tiny run, the ridge, LightGBM and the baseline blended as AutoML blends them, saved, then served from raw
    chain rows (``python -m vforge.predict``): the served IVs of a test date are the ensemble row's; ONNX export keeps
    parity."""
    pytest.importorskip("lightgbm")
    import pandas as pd
    from omegaconf import OmegaConf

    from vforge.evaluation import leaderboard as L
    from vforge.train import train

    from .conftest import CONF_DIR
    from .test_predict import raw_synthetic_chain, run_predict

    cfg = make_cfg()
    train(cfg)
    net, data = L.model_entry("mlp", cfg.output_dir, None)
    config = net.info["config"]
    model_cfg = OmegaConf.to_container(OmegaConf.load(f"{CONF_DIR}/model/linear.yaml"))
    members = [net, L.linear_entry(data, config, model_cfg), L.lightgbm_entry(data, n_threads=1),
               L.baseline_entry(data)]
    weights = {"mlp": 0.4, "linear": 0.2, "lightgbm": 0.3, "baseline": 0.1}  # every kind of member counts
    blended = np.stack([m.test_pred for m in members], axis=1) @ np.array(list(weights.values()))
    folder = L.save_ensemble(members, weights, data, config, tmp_path / "ensemble")

    date = data.test.rows["quote_date"].min()
    raw = raw_synthetic_chain(cfg)
    path = tmp_path / "chain.csv"
    raw[raw["quote_date"] <= date].to_csv(path, index=False)
    out = run_predict(folder, path)
    on_date = (data.test.rows["quote_date"] == date).to_numpy()
    expected = data.test.rows[on_date][["expiry", "strike", "option_type"]].assign(expected=blended[on_date])
    expected["expiry"] = pd.to_datetime(expected["expiry"])
    out["expiry"] = pd.to_datetime(out["expiry"])
    both = out.merge(expected, on=["expiry", "strike", "option_type"])
    assert len(both) == on_date.sum() > 0
    np.testing.assert_allclose(both["implied_volatility"], both["expected"], atol=2e-6)

    from vforge.export import export

    from .test_export import export_cfg

    report = export(export_cfg(folder, "onnx"))
    assert report["max_abs_diff_vol_pts"] / 100 < 1e-5, report  # ONNX Runtime against the eager ensemble
