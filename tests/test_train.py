"""End to end: train(cfg) on the tiny synthetic market, with and without MLflow."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from vforge.train import train


def test_train_end_to_end_returns_finite_metrics(make_cfg):
    metrics = train(make_cfg())
    for key in ("val/rmse", "val/mae", "val/r2", "test/rmse", "test/persistence_rmse", "test/prev_quoted_rmse"):
        assert math.isfinite(metrics[key]), key
    assert metrics["val/rmse"] > 0


def test_train_records_an_mlflow_run(make_cfg, mlflow_uri, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    cfg = make_cfg("logger=mlflow", f"logger.tracking_uri={mlflow_uri}", "logger.experiment=test-e2e")
    scratch = tmp_path / "scratch"  # a working directory that is not where the store is
    scratch.mkdir()
    monkeypatch.chdir(scratch)
    metrics = train(cfg)
    assert not (scratch / "mlruns").exists(), "artifacts went to ./mlruns of the working directory"
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("test-e2e")
    store_dir = Path(mlflow_uri.removeprefix("sqlite:///")).parent
    assert exp.artifact_location == (store_dir / "mlruns").as_uri()
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "mlp-synthetic"
    assert {k: run.data.tags[k] for k in ("model", "data", "target", "horizon", "evaluation")} == {
        "model": "mlp", "data": "synthetic", "target": "change", "horizon": "0", "evaluation": "holdout"}
    assert (store_dir / "mlruns" / run.info.run_id / "artifacts" / "model" / "model.pt").is_file()
    logged = run.data.metrics
    for key in ("val/rmse", "test/rmse", "val/persistence_rmse", "test/persistence_rmse", "test/baseline_rmse"):
        assert logged[key] == pytest.approx(metrics[key])
    assert run.data.params["model._target_"] == "vforge.models.mlp.MLP"
    history = client.get_metric_history(run.info.run_id, "val/rmse_epoch")
    assert len(history) == metrics["epochs"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "model", "data_report.json"} <= artifacts


def test_bad_optimized_metric_names_the_fix(make_cfg):
    with pytest.raises(ValueError, match=r"optimized_metric='val/rsme' is not logged.*val/rmse"):
        train(make_cfg("optimized_metric=val/rsme"))


def test_registering_a_model_that_is_not_logged_is_refused():
    from vforge.tracking.mlflow import MLflowLogger

    with pytest.raises(ValueError, match=r"registered_model='iv' needs logger.log_model=true"):
        MLflowLogger(tracking_uri="sqlite:///unused.db", experiment="x", log_model=False, registered_model="iv")


def test_no_progress_bar_when_stderr_is_not_a_terminal(make_cfg, capfd):
    # trainer.progress=auto draws a bar only on a terminal; under pytest stderr is a pipe
    cfg = make_cfg("trainer.progress=auto")
    train(cfg)
    assert "step/s" not in capfd.readouterr().err
