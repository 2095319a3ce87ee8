"""DDP through torchrun (vforge/training/distributed.py): the strategy's contract in-process, two gloo ranks
end to end (slow): one MLflow run, identical ranks, the single-process result with the same global batch, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_DATA
from tests.postgres import free_port
from vforge.train import train
from vforge.training.callbacks import Callback
from vforge.training.distributed import make_strategy

ROOT = Path(__file__).resolve().parents[1]
# dropout off: the ranks draw their masks for other rows than one process does, so only a model without
# dropout can match a single process
RUN = ["trainer.max_epochs=3", "trainer.num_threads=1", "model.n_blocks=2", "model.d_block=32", "model.dropout=0"]
# Global batches of 256 split 128 + 128 (the last one, of the 3,747 train rows, 83 + 82): DDP's mean of the
# ranks' mean gradients is then the batch's mean but for that last step's weighting and float summation order.
TOLERANCE = 1e-3  # vol points; measured: 2e-5


class DumpState(Callback):
    """Write this rank's per-epoch val RMSE and a checksum of its weights to ``<dir>/rank<r>.json``."""

    def __init__(self, dir: str) -> None:
        self.dir = Path(dir)

    def on_fit_end(self, state) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        weights = [float(p.double().sum()) for p in state.model.parameters()]
        record = {"val": [h["val/rmse_epoch"] for h in state.history], "weights": weights}
        (self.dir / f"rank{rank}.json").write_text(json.dumps(record))


def test_strategy_names_are_checked_and_ddp_needs_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=r"torchrun --standalone --nproc_per_node=<n> -m vforge.train"):
        make_strategy("ddp", torch.device("cpu"))
    with pytest.raises(ValueError, match="trainer.strategy must be single or ddp, got 'dpp'"):
        make_strategy("dpp", torch.device("cpu"))


def test_a_one_rank_ddp_run_is_the_single_process_run(make_cfg, monkeypatch):
    """The DDP code path (wrap, shard, all-reduce, broadcast, agreement) on a world of one changes no bit."""
    small = [*RUN[1:], "trainer.max_epochs=2"]
    single = train(make_cfg(*small))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    ddp = train(make_cfg(*small, "trainer.strategy=ddp"))
    assert not torch.distributed.is_initialized()  # the process group is closed after the run
    for k in single:
        if k != "train_seconds":
            assert ddp[k] == pytest.approx(single[k], abs=1e-9, nan_ok=True), k


def torchrun(tmp_path: Path, run_dir: str, *overrides: str, n: int = 2, check: bool = True):
    """``torchrun`` with ``n`` processes (``n=0``: plain ``python``) of a tiny training run into ``run_dir``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT),
               VFORGE_CACHE_DIR=str(tmp_path / "cache"))
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n
              else [sys.executable])
    cmd = [*launch, "-m", "vforge.train", "trainer=fast", *TINY_DATA, *RUN, f"hydra.run.dir={tmp_path / run_dir}",
           f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "logger.experiment=ddp", *overrides]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_gloo_ranks_train_one_model_like_one_process(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    dump = ["+trainer.callbacks.dump._target_=tests.test_ddp.DumpState", f"+trainer.callbacks.dump.dir={tmp_path}"]
    out = torchrun(tmp_path, "ddp", "trainer.strategy=ddp", *dump)
    log = out.stdout + out.stderr
    assert log.count("results") == 1 and log.count("epoch   0") == 1  # rank 0 alone prints
    assert "DDP: 2 processes (gloo)" in log and "2 ranks agree on every final metric" in log
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # the same weights and validation on both ranks, to the bit
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    torchrun(tmp_path, "single", n=0)
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert abs(ddp["val/rmse"] - single["val/rmse"]) < TOLERANCE and abs(ddp["test/rmse"] - single["test/rmse"]) < TOLERANCE
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 2  # one for the DDP job (not one per rank), one for the single process

    # killed after epoch 0, then resumed: the same MLflow run, the uninterrupted run's metrics
    stop = ["+trainer.callbacks.stop._target_=tests.test_resume.InterruptAfter", "+trainer.callbacks.stop.epoch=0"]
    assert torchrun(tmp_path, "resumed", "trainer.strategy=ddp", *stop, check=False).returncode != 0
    log = torchrun(tmp_path, "resumed", "trainer.strategy=ddp", "trainer.resume=auto")
    assert "resuming from" in log.stdout + log.stderr
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    for k in ("val/rmse", "test/rmse", "best_epoch"):
        assert resumed[k] == pytest.approx(ddp[k], abs=1e-6), k
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 3 and sorted(r.info.status for r in runs) == ["FINISHED"] * 3


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (DDP over NCCL)")
def test_ddp_over_nccl_with_bf16_on_gpus(tmp_path):
    n = min(2, torch.cuda.device_count())
    out = torchrun(tmp_path, "gpu", "trainer.strategy=ddp", "trainer.device=cuda", "trainer.precision=bf16", n=n)
    assert f"DDP: {n} processes (nccl)" in out.stdout + out.stderr
    assert json.loads((tmp_path / "gpu" / "metrics.json").read_text())["val/rmse"] < 10
