"""Crash-safe checkpoints and resume: atomic writes, a SIGKILL mid-epoch, the same MLflow run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_DATA
from vforge.train import train
from vforge.training.callbacks import Callback, TrainingInterrupted
from vforge.training.checkpoint import atomic_save, find_resume

ROOT = Path(__file__).resolve().parents[1]
# Every piece of state that must survive: cosine schedule, EMA, early stopping, dropout RNG, permutation RNG.
RUN = ["trainer.max_epochs=3", "trainer.num_threads=1", "trainer.patience=5", "averaging=ema", "model.n_blocks=2",
       "model.d_block=32"]


class SigkillAt(Callback):
    """Kill this process with SIGKILL halfway through epoch ``epoch`` (no cleanup, like an OOM kill)."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_step_end(self, state) -> None:
        if state.epoch == self.epoch and state.step == state.steps_per_epoch * self.epoch + state.steps_per_epoch // 2:
            os.kill(os.getpid(), signal.SIGKILL)


class InterruptAfter(Callback):
    """Stop on purpose after epoch ``epoch`` (after its checkpoint), as a pruner would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, state) -> None:
        if state.epoch == self.epoch:
            raise TrainingInterrupted(f"stopped after epoch {self.epoch}")


def same_metrics(a: dict[str, float], b: dict[str, float]) -> None:
    keys = sorted(set(a) - {"train_seconds"})
    assert keys == sorted(set(b) - {"train_seconds"})
    for k in keys:
        assert a[k] == pytest.approx(b[k], abs=1e-6, nan_ok=True), k


def test_atomic_save_never_leaves_a_torn_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1}, path)

    def crash(obj, f):  # half a file, then the process "dies"
        f.write(b"\x80\x02partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_find_resume(tmp_path):
    assert find_resume(None, tmp_path / "run") is None
    assert find_resume("auto", tmp_path / "new") is None
    with pytest.raises(FileNotFoundError, match="trainer.resume='nope.pt': no checkpoint"):
        find_resume("nope.pt", tmp_path)
    old = tmp_path / "old" / "checkpoints" / "last.pt"
    atomic_save({"finished": False, "run_name": "mlp"}, old)
    assert find_resume("auto", tmp_path / "new", "mlp") == old  # newest unfinished sibling with the same name
    assert find_resume("auto", tmp_path / "new", "resnet") is None
    assert find_resume(str(tmp_path / "old"), tmp_path / "new") == old  # a run folder
    atomic_save({"finished": True, "run_name": "mlp"}, old)
    assert find_resume("auto", tmp_path / "new", "mlp") is None


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(make_cfg, tmp_path):
    reference = train(make_cfg(*RUN))
    cfg = make_cfg(*RUN)
    with pytest.raises(TrainingInterrupted):
        train(cfg, callbacks=[InterruptAfter(epoch=0)])
    last = Path(cfg.output_dir) / "checkpoints" / "last.pt"
    assert torch.load(last, weights_only=False)["epoch"] == 0
    other = make_cfg(*RUN, "model.d_block=48", "trainer.resume=auto")
    other.output_dir = cfg.output_dir
    with pytest.raises(ValueError, match=r"trainer.resume: .*last.pt was trained with model=.*'d_block': 32"):
        train(other)
    cfg.trainer.resume = "auto"
    same_metrics(train(cfg), reference)
    assert torch.load(last, weights_only=False)["finished"]


def test_resumed_run_continues_the_same_mlflow_run(make_cfg, mlflow_uri):
    mlflow = pytest.importorskip("mlflow")
    cfg = make_cfg(*RUN, "logger=mlflow", f"logger.tracking_uri={mlflow_uri}", "logger.experiment=test-resume")
    with pytest.raises(TrainingInterrupted):
        train(cfg, callbacks=[InterruptAfter(epoch=1)])
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("test-resume").experiment_id])
    assert run.info.status == "KILLED"
    cfg.trainer.resume = "auto"
    metrics = train(cfg)
    (again,) = client.search_runs([client.get_experiment_by_name("test-resume").experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.metrics["val/rmse"] == pytest.approx(metrics["val/rmse"])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/rmse_epoch")]
    assert sorted(steps) == [0, 1, 2]


# Deliberately in the fast suite although it takes a few seconds (two subprocesses): crash safety is
# the promise of checkpoints, so every test run proves it.
def test_sigkill_mid_epoch_then_resume_gives_the_same_final_metrics(make_cfg, cache_dir, tmp_path):
    reference = train(make_cfg(*RUN))
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vforge.train", "trainer=fast", "logger=none", *TINY_DATA, *RUN,
           f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    kill = ["+trainer.callbacks.kill._target_=tests.test_resume.SigkillAt", "+trainer.callbacks.kill.epoch=1"]
    killed = subprocess.run(cmd + kill, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 0 and not ckpt["finished"]  # killed inside epoch 1: epoch 0 is the last complete one
    assert not (run_dir / "metrics.json").exists()
    resumed = subprocess.run(cmd + ["trainer.resume=auto"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr + resumed.stdout
    final = json.loads((run_dir / "metrics.json").read_text())
    same_metrics(final, reference)
    print("uninterrupted:", {k: reference[k] for k in ("val/rmse", "test/rmse", "val/raw_rmse")})
    print("killed+resumed:", {k: final[k] for k in ("val/rmse", "test/rmse", "val/raw_rmse")})


class CopyLastAt(Callback):
    """Keep a copy of ``src`` (last.pt) as it was after epoch ``epoch`` (runs after the Checkpoint callback)."""

    def __init__(self, epoch: int, src: Path, to: Path) -> None:
        self.epoch, self.src, self.to = epoch, src, to

    def on_epoch_end(self, state) -> None:
        if state.epoch == self.epoch:
            self.to.write_bytes(self.src.read_bytes())


def test_no_metric_point_is_logged_twice_after_a_resume(make_cfg, mlflow_uri, tmp_path):
    """Killed after epoch 1's metrics were logged but before its checkpoint: the resume redoes epoch 1 and
    must not log its points again."""
    mlflow = pytest.importorskip("mlflow")
    cfg = make_cfg(*RUN, "logger=mlflow", f"logger.tracking_uri={mlflow_uri}", "logger.experiment=test-twice")
    last, saved = Path(cfg.output_dir) / "checkpoints" / "last.pt", tmp_path / "after_epoch0.pt"
    with pytest.raises(TrainingInterrupted):
        train(cfg, callbacks=[CopyLastAt(0, last, saved), InterruptAfter(epoch=1)])
    last.write_bytes(saved.read_bytes())  # as if killed before epoch 1's checkpoint
    stale = last.parent / ".last.pt.abc123.tmp"
    stale.write_bytes(b"torn")  # and mid-write: atomic_save's temp file stays behind after a SIGKILL
    cfg.trainer.resume = "auto"
    train(cfg)
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("test-twice").experiment_id])
    for key in ("val/rmse_epoch", "train/loss"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [0, 1, 2], key
    assert not stale.exists()


def test_a_run_killed_before_its_first_checkpoint_is_continued_and_stale_runs_closed(make_cfg, mlflow_uri):
    """A kill after the MLflow run started but before last.pt existed: the run id in the run folder lets
    ``trainer.resume=auto`` continue that run; another RUNNING run of the folder is closed as KILLED."""
    mlflow = pytest.importorskip("mlflow")
    from vforge.tracking.mlflow import RUN_DIR_TAG, RUN_FILE

    cfg = make_cfg(*RUN, "logger=mlflow", f"logger.tracking_uri={mlflow_uri}", "logger.experiment=test-early-kill",
                   "trainer.resume=auto")
    folder = Path(cfg.output_dir).resolve()
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    exp = client.create_experiment("test-early-kill")
    # what the killed process left: its run RUNNING with the folder's id file, and an older run RUNNING too
    older = client.create_run(exp, tags={RUN_DIR_TAG: str(folder)}).info.run_id
    killed = client.create_run(exp, tags={RUN_DIR_TAG: str(folder)}).info.run_id
    folder.mkdir(parents=True)
    (folder / RUN_FILE).write_text(json.dumps({"run_id": killed, "tracking_uri": mlflow_uri}))
    metrics = train(cfg)
    runs = {r.info.run_id: r for r in client.search_runs([exp])}
    assert set(runs) == {older, killed}  # no third run
    assert runs[killed].info.status == "FINISHED" and runs[older].info.status == "KILLED"
    assert runs[killed].data.metrics["val/rmse"] == pytest.approx(metrics["val/rmse"])
    assert runs[killed].data.params["model._target_"].endswith("MLP")  # killed before its params: logged now
    assert json.loads((folder / RUN_FILE).read_text())["run_id"] == killed


@pytest.mark.slow
def test_sigkill_right_after_the_mlflow_run_starts_then_resume_leaves_one_finished_run(cache_dir, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "vforge.train", "trainer=fast", *TINY_DATA, *RUN, f"data.cache_dir={cache_dir}",
           f"hydra.run.dir={run_dir}", f"logger.tracking_uri={uri}"]
    kill = ["+trainer.callbacks.kill._target_=tests.test_resume.SigkillAt", "+trainer.callbacks.kill.epoch=0"]
    killed = subprocess.run(cmd + kill, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run_dir / "checkpoints" / "last.pt").exists() and (run_dir / "mlflow_run.json").exists()
    resumed = subprocess.run(cmd + ["trainer.resume=auto"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("vforge").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]


class CountSteps(Callback):
    """State that a resume must restore: the optimizer steps this callback has seen."""

    def __init__(self) -> None:
        self.seen = 0

    def on_step_end(self, state) -> None:
        self.seen += 1

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]


class ConfigCountSteps(CountSteps):
    """The same, built from ``trainer.callbacks`` (another name, so the checkpoint keeps both)."""


def test_user_and_config_callbacks_state_survives_a_resume(make_cfg):
    extra = "+trainer.callbacks.count._target_=tests.test_resume.ConfigCountSteps"
    cfg = make_cfg(*RUN, extra)
    with pytest.raises(TrainingInterrupted):
        train(cfg, callbacks=[CountSteps(), InterruptAfter(epoch=0)])
    last = Path(cfg.output_dir) / "checkpoints" / "last.pt"
    saved = torch.load(last, weights_only=False)
    steps_per_epoch = saved["step"]
    assert saved["callbacks"].get("CountSteps") == {"seen": steps_per_epoch}
    assert saved["callbacks"].get("ConfigCountSteps") == {"seen": steps_per_epoch}
    cfg.trainer.resume = "auto"
    counter = CountSteps()
    train(cfg, callbacks=[counter])
    final = torch.load(last, weights_only=False)
    assert counter.seen == final["step"] == 3 * steps_per_epoch  # counted on from the checkpoint, not from 0
    assert final["callbacks"]["ConfigCountSteps"] == {"seen": 3 * steps_per_epoch}
