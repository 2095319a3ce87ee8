"""AutoML: ensemble weights (closed forms), the leaderboard re-evaluating a checkpoint, reference rows;
a real AutoML sweep is marked slow."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vforge.evaluation import leaderboard as L
from vforge.evaluation.ensemble import fit_weights
from vforge.sweeps.automl import model_search_params
from vforge.train import train

from .conftest import TINY_DATA


def test_ensemble_weights_match_the_inverse_variance_closed_form():
    # two unbiased members with independent errors of sd 1 and 2: w1 = 4 / (1 + 4) = 0.8
    rng = np.random.default_rng(0)
    y = rng.normal(0.2, 0.05, 200_000)
    preds = np.stack([y + rng.normal(0, 0.01, y.size), y + rng.normal(0, 0.02, y.size)], axis=1)
    w = fit_weights(preds, y)
    assert w == pytest.approx([0.8, 0.2], abs=0.01)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()


def test_ensemble_is_never_worse_than_its_best_member_on_validation():
    rng = np.random.default_rng(1)
    for _ in range(20):
        y = rng.normal(0.2, 0.05, 300)
        k = rng.integers(2, 5)
        preds = y[:, None] + rng.normal(rng.normal(0, 0.01, k), rng.uniform(0.001, 0.03, k), (300, k))
        w = fit_weights(preds, y)
        best = min(np.mean((preds[:, j] - y) ** 2) for j in range(k))
        assert np.mean((preds @ w - y) ** 2) <= best + 1e-15
        assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
    # a copy of the best member adds nothing; a useless member gets no weight
    y = rng.normal(0.2, 0.05, 500)
    good = y + rng.normal(0, 0.01, 500)
    assert fit_weights(np.stack([good, good + 0.3], axis=1), y) == pytest.approx([1.0, 0.0], abs=1e-6)


def test_ensemble_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"val_preds must be \(n_val, n_models\) with n_val=3"):
        fit_weights(np.zeros((4, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_weights(np.array([[0.1, np.nan], [0.2, 0.2]]), np.array([0.1, 0.2]))


def test_leaderboard_ranks_by_validation_and_writes_markdown_and_csv(tmp_path):
    class Split:
        def __init__(self, iv):
            self.iv = iv

    class Data:
        val, test = Split(np.array([0.20, 0.30, 0.25])), Split(np.array([0.22, 0.28]))

    good = L.Entry("good", "model", Data.val.iv + 0.001, Data.test.iv + 0.05).score(Data)
    bad = L.Entry("bad", "model", Data.val.iv + 0.01, Data.test.iv).score(Data)
    assert good.val["rmse"] == pytest.approx(0.1) and good.test["rmse"] == pytest.approx(5.0)
    rows = L.rank([bad, good])
    assert [r["name"] for r in rows] == ["good", "bad"]  # by val RMSE, even though "bad" wins on test
    assert [r["name"] for r in L.rank([good, bad], first=bad)] == ["bad", "good"]  # the pick ahead of all
    md, csv = L.write(rows, tmp_path, title="t")
    assert "| 1 | good | model | 0.100 | - | 5.000 |" in md.read_text()
    assert list(pd.read_csv(csv)["name"]) == ["good", "bad"]


def test_a_checkpoint_re_evaluates_to_the_metrics_of_its_run(make_cfg):
    cfg = make_cfg("model.n_blocks=1", "model.d_block=16")
    metrics = train(cfg)
    entry, data = L.model_entry("mlp", cfg.output_dir, None, latency_rows=50)
    assert entry.val["rmse"] == pytest.approx(metrics["val/rmse"], rel=1e-5)
    assert entry.test["r2"] == pytest.approx(metrics["test/r2"], rel=1e-5)
    assert entry.n_params == metrics["n_params"] and entry.latency_ms_1k > 0 and entry.latency_ms_row > 0
    base = L.baseline_entry(data)
    assert base.val["rmse"] == pytest.approx(np.sqrt(np.mean((data.val.base - data.val.iv) ** 2)) * 100)
    assert entry.test["prev_quoted_rmse"] == pytest.approx(metrics["test/prev_quoted_rmse"], rel=1e-5)
    assert entry.test["dm_pvalue"] == pytest.approx(metrics["test/dm_pvalue"], rel=1e-5)
    pers = L.persistence_entry(data)  # one meaning: the contract's previous IV, on the rows that have one
    assert math.isnan(pers.val["rmse"]) and pers.beats_persistence() == "-"
    assert pers.test["prev_quoted_rmse"] == pytest.approx(metrics["test/persistence_rmse"], rel=1e-9)
    ens, weights = L.ensemble_entry([entry, base], data)
    assert ens.val["rmse"] <= min(entry.val["rmse"], base.val["rmse"]) + 1e-12
    assert sum(weights.values()) == pytest.approx(1.0)


def test_lightgbm_reference_row_beats_a_constant(make_cfg):
    pytest.importorskip("lightgbm")
    data = instantiate(make_cfg().data, _convert_="all")
    row = L.lightgbm_entry(data, n_threads=1, latency_rows=50)
    const = np.full_like(data.test.iv, data.train.iv.mean())
    assert row.test["rmse"] < np.sqrt(np.mean((const - data.test.iv) ** 2)) * 100
    assert row.n_params > 0 and row.train_s > 0


def test_search_params_of_a_model_come_from_its_yaml():
    params = model_search_params("mlp")
    assert params["optimizer.lr"].startswith("tag(log")
    with pytest.raises(FileNotFoundError, match=r"no hparams_search config .nope.: expected conf/hparams_search/nope.yaml"):
        model_search_params("nope")


@pytest.mark.slow
def test_automl_writes_a_leaderboard_with_reference_rows_and_an_ensemble(tmp_path):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", VFORGE_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "vforge.automl", "hydra.sweeper.models=[mlp,resnet]", "hydra.sweeper.n_trials=2",
           "trainer=fast", *TINY_DATA, f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
           f"hydra.sweep.dir={tmp_path}/automl", f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
           "trainer.num_threads=1", "hydra.sweeper.registered_model=automl-iv"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    board = pd.read_csv(Path(tmp_path) / "automl" / "leaderboard.csv")
    assert {"mlp", "resnet", "persistence", "baseline", "ssvi", "linear", "lightgbm"} <= set(board["name"])
    assert {"test_prev_quoted_rmse", "test_dm_pvalue", "test_dates_beaten", "beats_persistence",
            "test_arb_calendar", "test_arb_butterfly"} <= set(board.columns)
    ens = board[board["kind"] == "ensemble"]
    assert len(ens) == 1 and {"linear", "lightgbm", "baseline"} <= set(ens["name"].iloc[0][len("ensemble("):-1].split("+"))
    saved = json.loads((Path(tmp_path) / "automl" / "ensemble.json").read_text())
    assert sum(saved["weights"].values()) == pytest.approx(1.0) and saved["dates_capped_at"] == 0.9
    # rank 1 is AutoML's pick (model=linear unless a searched model or the ensemble won clearly), the rest by val
    assert board["name"].iloc[0] == saved["pick"] and board["notes"].iloc[0].startswith("AutoML's pick: ")
    assert saved["pick"] == "linear" or board["kind"].iloc[0] in ("model", "ensemble")
    rest = board.iloc[1:]
    assert (board["rank"] == range(1, len(board) + 1)).all() and rest["val_rmse"].dropna().is_monotonic_increasing
    assert board["name"].iloc[-1] == "persistence"  # no all-row score: ranked last
    assert "AutoML's pick: " + saved["pick"] in out.stderr + out.stdout
    assert (Path(tmp_path) / "automl" / "leaderboard.md").read_text().startswith("### AutoML leaderboard")
    # what to serve: the pick, or (an ensemble pick) the same rule among the rest; a run folder either way
    serve = saved["serve"]
    assert serve["name"] == saved["pick"]  # the ensemble too: it is saved as a run
    assert f"run={serve['run']}" in out.stderr + out.stdout
    # the linear row and the ensemble (networks, ridge, LightGBM's trees in torch, baseline) are saved as runs, and
    # re-evaluating each run gives its row's scores; the ensemble re-marks raw chain rows like any run
    for name, folder in (("linear", "linear"), (ens["name"].iloc[0], "ensemble")):
        entry, _ = L.model_entry(name, Path(tmp_path) / "automl" / folder, None)
        row = board.set_index("name").loc[name]
        assert entry.val["rmse"] == pytest.approx(row["val_rmse"], rel=1e-4), name
        assert entry.test["rmse"] == pytest.approx(row["test_rmse"], rel=1e-4), name
    assert serve["run"] is not None  # every pick is a run folder now
    from vforge.serving import load_run

    chain = load_run(Path(tmp_path) / "automl" / "ensemble")
    assert chain.bundle.config["model"]["_target_"] == "vforge.models.ensemble.Ensemble"
    # the served pick is registered: the registered model re-marks raw rows as its run folder does
    from .test_predict import last_two_dates, run_predict

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = tmp_path / "chain.csv"
    last_two_dates(OmegaConf.create({"data": chain.bundle.config["data"]}), path)
    registered = run_predict("models:/automl-iv/1", path, tmp_path / "reg.csv", uri)
    folder = run_predict(serve["run"], path, tmp_path / "folder.csv")
    pd.testing.assert_frame_equal(registered.reset_index(drop=True), folder, check_dtype=False)


def automl_sweeper(**kw):
    from vforge.sweeps.automl import AutoMLSweeperImpl

    args = dict(sampler=None, pruner=None, models=["mlp"], n_trials=2, minutes=None, n_jobs=1, storage=None,
                study_name="automl", max_failure_rate=0.5, ensemble_size=3, lightgbm=False, latency_rows=100,
                heartbeat_interval=None, grace_period=None, mlflow=False)
    return AutoMLSweeperImpl(**(args | kw))


def test_an_unsaved_ensemble_pick_names_what_to_serve_instead():
    from vforge.sweeps.automl import AutoMLSweeperImpl

    def entry(name: str, kind: str, run: str | None) -> L.Entry:
        return L.Entry(name, kind, np.zeros(1), np.zeros(1), info={} if run is None else {"output_dir": run})

    ens, mlp, base = entry("ensemble(mlp+linear)", "ensemble", None), entry("mlp", "model", "/r/mlp"), \
        entry("baseline", "reference", None)
    assert AutoMLSweeperImpl.serving_line(mlp, mlp) == "serve the pick: python -m vforge.predict run=/r/mlp input=<chain>"
    line = AutoMLSweeperImpl.serving_line(ens, mlp)
    assert "was not saved as a servable model" in line and line.endswith("picks mlp: python -m vforge.predict run=/r/mlp "
                                                                    "input=<chain>")
    assert "persistence: no model to serve" in AutoMLSweeperImpl.serving_line(base, base)


def test_registering_the_pick_needs_the_parent_run():
    with pytest.raises(ValueError, match="registered_model='iv' needs hydra.sweeper.mlflow=true"):
        automl_sweeper(registered_model="iv", mlflow=False)


def test_the_sweep_parent_run_registers_a_run_folder_and_stays_running(make_cfg, mlflow_uri):
    from mlflow import MlflowClient

    from vforge.sweeps.tracking import SweepRun

    cfg = make_cfg()
    train(cfg)
    parent = SweepRun(mlflow_uri, "test-automl-register", "automl-parent")
    uri = parent.log_chain_model(Path(cfg.output_dir) / "model.pt", "automl-register-iv")
    client = MlflowClient(tracking_uri=mlflow_uri)
    (version,) = client.search_model_versions("name='automl-register-iv'")
    assert uri is not None and version.run_id == parent.run_id
    assert client.get_run(parent.run_id).info.status == "RUNNING"  # ended by the sweep, not by the registration
    parent.end()
    assert client.get_run(parent.run_id).info.status == "FINISHED"


def test_automl_says_how_to_choose_models_and_budgets():
    with pytest.raises(ValueError, match=r"hydra.sweeper.models=\[mlp,resnet\]"):
        automl_sweeper(models=[])
    with pytest.raises(ValueError, match="give each model a budget"):
        automl_sweeper(n_trials=0, minutes=None)
    with pytest.raises(ValueError, match=r"not model=\.\.\."):
        automl_sweeper().sweep(["model=resnet"])
    with pytest.raises(ValueError, match=r"Edit conf/hparams_search/<model>.yaml"):
        automl_sweeper().sweep(["model.d_block=choice(8,16)"])


def test_the_automl_experiment_composes_with_the_automl_sweeper():
    from hydra import compose, initialize_config_dir

    from .conftest import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=automl", "hydra.sweeper.models=[mlp,tabm]"],
                      return_hydra_config=True)
    sw = cfg.hydra.sweeper
    assert sw._target_.endswith("AutoMLSweeper") and list(sw.models) == ["mlp", "tabm"]
    assert sw.sampler._target_.endswith("TPESampler") and sw.pruner.n_startup_trials == 2
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.optimized_metric == "val/rmse"
    for model in sw.models:  # every model it names has a search space
        assert model_search_params(model)
