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


def test_a_fresh_sqlite_store_is_created_unsynced_and_its_connections_synced_again(tmp_path):
    pytest.importorskip("mlflow")
    from sqlalchemy import create_engine, text

    from vforge.tracking.mlflow import unsynced_creation

    db = tmp_path / "fresh.db"

    def synchronous(conn) -> int:
        return conn.execute(text("PRAGMA synchronous")).scalar_one()

    with unsynced_creation(str(db)):
        engine = create_engine(f"sqlite:///{db}")
        conn = engine.connect()
        inside = synchronous(conn)
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
        conn.commit()
    assert inside == 0  # OFF while the store is created
    assert synchronous(conn) == 2  # FULL again on the same (pooled) connection afterwards
    conn.close()
    with unsynced_creation(str(db)):  # the file exists now: nothing changes
        conn = create_engine(f"sqlite:///{db}").connect()
        assert synchronous(conn) == 2
        conn.close()
    with unsynced_creation(None):  # not a SQLite store
        pass


def test_mlflow_telemetry_is_off_unless_asked_for():
    import os
    import subprocess
    import sys

    check = "import os, vforge; print(os.environ['MLFLOW_DISABLE_TELEMETRY'])"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_DISABLE_TELEMETRY"}
    out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "true"
    out = subprocess.run([sys.executable, "-c", check], env={**env, "MLFLOW_DISABLE_TELEMETRY": "false"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "false"
