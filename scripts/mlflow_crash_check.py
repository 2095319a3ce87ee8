"""Concurrency and crash checks of MLflow tracking (issue 11), in a scratch folder.

    python scripts/mlflow_crash_check.py concurrent [n_jobs=4] [rounds=1]
    python scripts/mlflow_crash_check.py kill [seconds=2]

``concurrent``: ``n_jobs`` ``python -m vforge.train`` jobs started at once on a fresh SQLite store, ``rounds``
times (a new store each round); prints each run's status. ``kill``: a job SIGKILLed ``seconds`` after its MLflow run
started (``mlflow_run.json`` appears in its run folder), then rerun with ``trainer.resume=auto`` in the same
folder; prints the runs in the store. Small jobs (trainer=fast, 40 synthetic days, 1 thread each).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB = ["trainer=fast", "trainer.num_threads=1", "data.n_days=40", "data.listing.n_monthlies=4",
       "data.listing.n_weeklies=2"]


def job(tmp: Path, uri: str | None, run_dir: Path, *extra: str) -> list[str]:
    logger = [f"logger.tracking_uri={uri}"] if uri else ["logger=none"]
    return [sys.executable, "-m", "vforge.train", *JOB, *logger, f"hydra.run.dir={run_dir}",
            f"data.cache_dir={tmp / 'cache'}", *extra]


def runs(uri: str) -> list[tuple[str, str]]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return [(r.info.run_id[:8], r.info.status) for r in client.search_runs(exps)]


def concurrent(n_jobs: int = 4, rounds: int = 1) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    finished = total = 0
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        subprocess.run(job(tmp, None, tmp / "warm"), cwd=ROOT, env=env,
                       capture_output=True, check=True)  # the data cache, so that the jobs race on the store only
        for r in range(rounds):
            uri = f"sqlite:///{tmp / f'fresh{r}.db'}"
            procs = [subprocess.Popen(job(tmp, uri, tmp / f"r{r}_job{i}"), cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                     for i in range(n_jobs)]
            codes = [p.wait() for p in procs]
            for p, code in zip(procs, codes):
                if code:
                    print(f"round {r}: a job failed:\n{p.stderr.read()[-1500:]}")
            statuses = runs(uri)
            finished += sum(s == "FINISHED" for _, s in statuses)
            total += n_jobs
            print(f"round {r}: exit codes {codes}; runs {statuses}")
    print(f"{finished} of {total} runs FINISHED ({n_jobs} jobs at once on a fresh SQLite store, {rounds} round(s))")


def kill(seconds: float = 2.0) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        uri, run_dir = f"sqlite:///{tmp / 'mlflow.db'}", tmp / "run"
        cmd = job(tmp, uri, run_dir, "trainer.max_epochs=30", "trainer.patience=30")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (run_dir / "mlflow_run.json").exists():
            if proc.poll() is not None:
                raise SystemExit("the job ended before its MLflow run started")
            time.sleep(0.05)
        time.sleep(seconds)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        ckpt = (run_dir / "checkpoints" / "last.pt").exists()
        print(f"SIGKILLed {seconds:g} s after the MLflow run started (last.pt {'written' if ckpt else 'not yet'}); "
              f"runs: {runs(uri)}")
        again = subprocess.run(cmd + ["trainer.resume=auto"], cwd=ROOT, env=env, capture_output=True, text=True)
        print(f"rerun with trainer.resume=auto: exit {again.returncode}; runs: {runs(uri)}")
        if again.returncode:
            print(again.stderr[-2000:])


if __name__ == "__main__":
    what, *args = sys.argv[1:] or ["concurrent"]
    {"concurrent": concurrent, "kill": kill}[what](*(float(a) if what == "kill" else int(a) for a in args))
