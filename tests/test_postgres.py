"""Optuna and MLflow on a real PostgreSQL server (the ``postgres`` fixture: tests/postgres.py).

Several sweep workers on one study and many jobs writing to one MLflow tracking server are what a
shared database is for; SQLite files serve one machine. The real CLI sweep on PostgreSQL is in
tests/test_sweep.py (slow, parametrized over the storage).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from vforge.sweeps import study as S

from .conftest import TINY_DATA
from .postgres import free_port

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import sys
from pathlib import Path
from tests.test_postgres import logging_job
from tests.test_sweep import make_sweeper
make_sweeper(Path(sys.argv[1]), logging_job, storage=sys.argv[2], study_name="shared", n_trials=8, n_jobs=1).sweep([])
"""


def logging_job(values: dict) -> float:
    """A job that rebuilds its trial from the environment, as a real one does, and appends its number to a log."""
    trial = S.trial_from_env()
    assert trial is not None and trial.params["x"] == values["x"]
    with open(os.environ["TRIAL_LOG"], "a") as fh:
        fh.write(f"{trial.number}\n")
    return values["x"]


@pytest.mark.slow  # ~7 s idle, 25 s on a busy machine: two interpreters importing torch, Hydra and Optuna
def test_two_sweep_workers_share_one_study_in_postgres(postgres, tmp_path):
    url = postgres.url()
    env = lambda i: dict(os.environ, TRIAL_LOG=str(tmp_path / f"worker{i}.log"), PYTHONPATH=str(ROOT))  # noqa: E731
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / f"w{i}"), url], cwd=ROOT, env=env(i),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    ran = [[int(n) for n in (tmp_path / f"worker{i}.log").read_text().split()] for i in range(2)]
    study = optuna.load_study(study_name="shared", storage=url)
    assert len(study.trials) == 8 == len(ran[0]) + len(ran[1])  # n_trials is the study's total, not each worker's
    assert sorted(ran[0] + ran[1]) == list(range(8))  # no trial ran twice
    assert all(t.state == TrialState.COMPLETE and t.value == t.params["x"] for t in study.trials)


@contextlib.contextmanager
def mlflow_server(backend: str, artifacts: Path) -> Iterator[str]:
    """``mlflow server`` on a free port with proxied artifacts; stopped (its whole process group) on exit."""
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    cmd = ["mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination", str(artifacts),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    # its log goes to a file: a pipe nobody reads fills after a few hundred access-log lines and the server's
    # workers then block writing them (4 jobs logging their models did that)
    log = artifacts.parent / "mlflow-server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not answer /health within 120 s")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_an_mlflow_server_on_postgres_takes_four_concurrent_jobs(postgres, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    with mlflow_server(postgres.url(), tmp_path / "artifacts") as url:
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", VFORGE_CACHE_DIR=str(tmp_path / "cache"),
                   PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "vforge.train", "-m", "seed=1,2,3,4", "hydra/launcher=joblib",
               "hydra.launcher.n_jobs=4", "trainer=fast", "trainer.num_threads=1", *TINY_DATA,
               f"logger.tracking_uri={url}", "logger.experiment=four", f"hydra.sweep.dir={tmp_path}/sweep"]
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        client = mlflow.MlflowClient(url)
        runs = client.search_runs([client.get_experiment_by_name("four").experiment_id])
        assert sorted(int(r.data.params["seed"]) for r in runs) == [1, 2, 3, 4]
        saved = sorted(json.loads(f.read_text())["val/rmse"] for f in (tmp_path / "sweep").glob("*/metrics.json"))
        assert sorted(r.data.metrics["val/rmse"] for r in runs) == pytest.approx(saved) and len(saved) == 4
        for r in runs:  # every job's epochs and model reached the server too
            assert r.info.status == "FINISHED"
            assert [m.step for m in client.get_metric_history(r.info.run_id, "val/rmse_epoch")] == [0, 1]
            assert {a.path for a in client.list_artifacts(r.info.run_id)} >= {"config.yaml", "data_report.json",
                                                                                 "model"}


def test_the_storage_lock_is_held_across_connections(postgres):
    url, events = postgres.url(), []

    def hold():
        with S.storage_lock(url):
            events.append("a in")
            time.sleep(0.5)
            events.append("a out")

    first = threading.Thread(target=hold)
    first.start()
    while not events:
        time.sleep(0.01)
    with S.storage_lock(url):  # another connection: waits for the first to let go
        events.append("b in")
    first.join()
    assert events == ["a in", "a out", "b in"]
