"""vforge's Optuna sweeper: parameter parsing, pruned/failed trial recording, stale trials, discovery;
real sweeps (resume, two processes on one study, MLflow parent/child) are marked slow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from vforge.sweeps import study as S
from vforge.sweeps.pruning import PruningCallback, TrialPruned
from vforge.sweeps.search_space import format_value, grid_search_space, parse_params

from .conftest import CONF_DIR, TINY_DATA

ROOT = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)


# --- parameter parsing: the official plugin's grammar ---


def test_params_parse_into_optuna_distributions():
    space, fixed, other = parse_params({
        "model.n_blocks": "range(1, 4)",
        "model.d_block": "choice(64, 128, 256)",
        "model.dropout": "interval(0.0, 0.5)",
        "optimizer.lr": "tag(log, interval(1e-5, 1e-3))",
        "model.d_hidden": "tag(log, range(16, 512))",
        "model.act": "relu,gelu",
        "trainer.batch_size": "range(128, 1024, step=128)",
        "loss.delta": "range(0.5, 2.0, step=0.5)",
        "seed": "3",
    })
    assert space["model.n_blocks"] == IntDistribution(1, 4)  # high included, as in the official plugin
    assert space["model.d_block"] == CategoricalDistribution([64, 128, 256])
    assert space["model.dropout"] == FloatDistribution(0.0, 0.5)
    assert space["optimizer.lr"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert space["model.d_hidden"] == IntDistribution(16, 512, log=True)
    assert space["model.act"] == CategoricalDistribution(["relu", "gelu"])
    assert space["trainer.batch_size"] == IntDistribution(128, 1024, step=128)
    assert space["loss.delta"] == FloatDistribution(0.5, 2.0, step=0.5)
    assert fixed == {"seed": "3"} and other == []


def test_command_line_overrides_win_over_params():
    space, fixed, other = parse_params({"model.dropout": "interval(0.0, 0.5)", "model.d_block": "choice(8, 16)"},
                                       ["model.dropout=0.1", "model.d_block=choice(32,64)", "model=resnet"])
    assert "model.dropout" not in space and space["model.d_block"] == CategoricalDistribution([32, 64])
    assert other == ["model.dropout=0.1", "model=resnet"] and fixed == {}


def test_bad_params_say_what_to_write():
    with pytest.raises(ValueError, match=r"tag\(log, \.\.\.\) applies to interval\(lo, hi\) or range"):
        parse_params({"model.d_block": "tag(log, choice(1, 2))"})
    with pytest.raises(ValueError, match=r"needs int bounds and no step"):
        parse_params({"model.d_block": "tag(log, range(8, 64, step=8))"})
    with pytest.raises(ValueError, match="grid sampler needs choice"):
        grid_search_space(parse_params({"optimizer.lr": "interval(0.1, 0.2)"})[0])
    assert grid_search_space(parse_params({"a": "choice(1, 2)", "b": "range(1, 3)"})[0]) == {"a": [1, 2],
                                                                                           "b": [1, 2, 3]}


@pytest.mark.parametrize("value", [1, 0.000123, 1e-5, -2.5, True, None, "relu", "a,b", "it's", "x=y", "sqlite:///a/b.db",
                                   '{"_target_": "optuna.pruners.MedianPruner", "n": 1}'])
def test_override_values_round_trip(value):
    (override,) = OverridesParser.create().parse_overrides([f"key={format_value(value)}"])
    assert override.value() == value


# --- the ask/tell loop with a fake launcher: pruned, failed and complete trials ---


class FakeLauncher:
    """Runs ``job(overrides)`` in this process with the job's env_set applied, as Hydra's basic launcher does."""

    def __init__(self, job):
        self.job = job
        self.parser = OverridesParser.create()

    def launch(self, batch, initial_job_idx):
        returns = []
        for overrides in batch:
            parsed = self.parser.parse_overrides(list(overrides))
            env = {o.key_or_group.split(".")[-1]: o.value() for o in parsed if "env_set" in o.key_or_group}
            values = {o.key_or_group: o.value() for o in parsed if "env_set" not in o.key_or_group}
            saved = dict(os.environ)
            os.environ.update(env)
            ret = JobReturn(overrides=list(overrides))
            try:
                ret.return_value = self.job(values)
                ret.status = JobStatus.COMPLETED
            except Exception as e:  # noqa: BLE001 - what hydra.core.utils.run_job does
                ret.return_value, ret.status = e, JobStatus.FAILED
            finally:
                os.environ.clear()
                os.environ.update(saved)
            returns.append(ret)
        return returns


def fake_job(values):
    """x < 0.3 fails, x > 0.7 reports a bad curve (pruned once a few trials have finished), else completes."""
    x = values["x"]
    if x < 0.3:
        raise ValueError(f"diverged at x={x}")
    trial = S.trial_from_env()
    assert trial is not None and trial.params["x"] == x
    cb = PruningCallback(trial)
    for epoch in range(4):
        cb(epoch, {"val/rmse_epoch": (10.0 if x > 0.7 else 1.0) - 0.1 * epoch})  # good curves tie the median
    return 1.0 + x


def make_sweeper(tmp_path, job, **kw):
    from vforge.sweeps.sweeper import OptunaSweeperImpl

    args = dict(sampler={"_target_": "optuna.samplers.RandomSampler", "seed": 0},
                pruner={"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 2, "n_warmup_steps": 0},
                direction="minimize", storage=f"journal:///{tmp_path}/study.log", study_name="fake", n_trials=12,
                n_jobs=2, max_failure_rate=1.0, timeout=None, heartbeat_interval=None, grace_period=None,
                search_space=None, params={"x": "interval(0.0, 1.0)"}, custom_search_space=None, mlflow=False)
    sweeper = OptunaSweeperImpl(**(args | kw))
    sweeper.launcher = FakeLauncher(job)
    sweeper.validate_batch_is_legal = lambda batch: None
    sweeper.sweep_dir = tmp_path / "sweep"
    return sweeper


def test_pruned_and_failed_trials_are_recorded_as_such(tmp_path):
    sweeper = make_sweeper(tmp_path, fake_job)  # a journal file: the same storage API, far fewer fsyncs than SQLite
    sweeper.sweep([])
    study = optuna.load_study(study_name="fake", storage=S.open_storage(f"journal:///{tmp_path}/study.log"))
    trials = study.trials
    assert len(trials) == 12
    for t in trials:
        x = t.params["x"]
        if x < 0.3:
            assert t.state == TrialState.FAIL and "diverged" in t.user_attrs[S.ATTR_ERROR]
        elif t.state == TrialState.PRUNED:
            assert x > 0.7 and t.user_attrs["pruned_epoch"] == max(t.intermediate_values)
        else:
            assert t.state == TrialState.COMPLETE and t.value == pytest.approx(1.0 + x)
    # once two good trials finished, every bad curve is pruned at its first report
    states = {t.state for t in trials if t.params["x"] > 0.7 and t.number >= 4}
    assert states <= {TrialState.PRUNED}
    assert any(t.state == TrialState.PRUNED for t in trials)
    assert study.best_trial.params["x"] <= 0.7
    assert (tmp_path / "sweep" / "optimization_results.yaml").exists()
    # env vars were set for the job only
    assert S.ENV_TRIAL_ID not in os.environ


def test_a_rerun_counts_toward_n_trials_and_failures_stop_the_sweep(tmp_path):
    db = f"journal:///{tmp_path}/rerun.log"  # SQLite, the default, is exercised by the slow real sweeps
    make_sweeper(tmp_path, lambda v: v["x"], n_trials=2, storage=db).sweep([])
    make_sweeper(tmp_path, lambda v: v["x"], n_trials=3, storage=db).sweep([])
    study = optuna.load_study(study_name="fake", storage=S.open_storage(db))
    assert [t.number for t in study.trials] == [0, 1, 2]

    def boom(values):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match=r"4 trial\(s\) failed, more than max_failure_rate=0.2 x n_trials=10.*"
                                           r"CUDA out of memory"):
        make_sweeper(tmp_path, boom, n_trials=10, study_name="boom", max_failure_rate=0.2).sweep([])
    boomed = optuna.load_study(study_name="boom", storage=S.open_storage(f"journal:///{tmp_path}/study.log"))
    assert [t.state for t in boomed.trials] == [TrialState.FAIL] * 4  # 2 batches of n_jobs=2


def test_a_trial_left_running_by_a_killed_sweep_is_failed_and_retried(tmp_path):
    url = f"journal:///{tmp_path}/stale.log"
    study = S.create_study(url, "stale", ["minimize"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    trial = study.ask({"x": FloatDistribution(0, 1)})
    trial.set_user_attr(S.ATTR_HOST, __import__("socket").gethostname())
    trial.set_user_attr(S.ATTR_PID, gone.pid)
    alive = study.ask({"x": FloatDistribution(0, 1)})
    S.claim(alive)  # this process: still running, not stale
    assert S.fail_stale_trials(study) == [trial.number]
    t0, t1, retry = study.get_trials()
    assert t0.state == TrialState.FAIL and t0.user_attrs[S.ATTR_STALE]
    assert t1.state == TrialState.RUNNING
    assert retry.state == TrialState.WAITING and retry.user_attrs[S.ATTR_RETRY_OF] == t0.number
    assert S.n_counted(study) == 2  # the running one and the retry; the stale one does not count
    again = study.ask({"x": FloatDistribution(0, 1)})
    assert again.number == retry.number and again.params == t0.params


def test_trial_from_env_is_none_outside_a_sweep():
    assert S.trial_from_env({}) is None


def test_pruning_callback_stops_a_diverged_run(tmp_path):
    study = S.create_study(f"journal:///{tmp_path}/d.log", "d", ["minimize"])
    cb = PruningCallback(study.ask())
    with pytest.raises(TrialPruned, match="nan"):
        cb(0, {"val/rmse_epoch": float("nan")})
    with pytest.raises(KeyError, match="val/rmse_epoch"):
        cb(1, {"train/loss": 1.0})
    assert issubclass(TrialPruned, optuna.TrialPruned) and TrialPruned.run_status == "KILLED"


# --- Hydra: discovery and config composition ---


def test_hydra_discovers_the_sweepers_and_composes_a_search_space():
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    names = {p.__name__ for p in Plugins.instance().discover(Sweeper)}
    assert {"OptunaSweeper", "AutoMLSweeper"} <= names
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=mlp", "hydra/sweeper/pruner=hyperband"],
                      return_hydra_config=True)
    sw = cfg.hydra.sweeper
    assert sw._target_ == "hydra_plugins.vforge_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sw.sampler._target_ == "optuna.samplers.TPESampler"
    assert sw.pruner._target_ == "optuna.pruners.HyperbandPruner"
    assert cfg.model._target_ == "vforge.models.mlp.MLP" and sw.study_name == "mlp"


# --- real sweeps (subprocesses) ---


def run_sweep(tmp_path: Path, name: str, *overrides: str, background: bool = False, model: str = "mlp",
              storage: str | None = None):
    # PYTHONPATH: the jobs import this checkout's vforge, not whichever one is pip-installed
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", VFORGE_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "vforge.train", "-m", f"hparams_search={model}", "trainer=fast", *TINY_DATA,
           f"hydra.sweeper.storage={storage or f'sqlite:///{tmp_path}/optuna.db'}", f"hydra.sweep.dir={tmp_path}/{name}",
           f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "logger.experiment=sweep-test",
           "trainer.num_threads=1", *overrides]
    if background:
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def trial_numbers_run(sweep_dir: Path) -> list[int]:
    """The trial numbers of the jobs a sweep launched (from each job's saved overrides)."""
    out = []
    for f in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        out += [int(line.split("=")[1]) for line in f.read_text().splitlines() if line.startswith("- trial=")]
    return out


@pytest.mark.slow
def test_sweep_resumes_with_parent_and_child_runs_in_mlflow(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    log = run_sweep(tmp_path, "first", "hydra.sweeper.n_trials=2", "trainer.max_epochs=3",
                    "hydra/sweeper/pruner=threshold", "hydra.sweeper.pruner.upper=0.01")
    assert "PRUNED at epoch 0" in log
    run_sweep(tmp_path, "again", "hydra.sweeper.n_trials=3", "trainer.max_epochs=3")  # the same sweep, continued
    study = optuna.load_study(study_name="mlp", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2 + [TrialState.COMPLETE]
    assert trial_numbers_run(tmp_path / "first") == [0, 1] and trial_numbers_run(tmp_path / "again") == [2]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("vforge.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["optuna.state"] for r in children) == ["COMPLETE", "PRUNED", "PRUNED"]
    assert {r.info.status for r in children if r.data.tags["optuna.state"] == "PRUNED"} == {"KILLED"}
    assert parent.data.metrics["best/trial"] == 2 and "best/test/rmse" in parent.data.metrics
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert "optuna/optimization_history.png" in arts


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_two_sweep_processes_share_one_study(tmp_path, backend, request):
    storage = request.getfixturevalue("postgres").url() if backend == "postgres" else f"sqlite:///{tmp_path}/optuna.db"
    procs = [run_sweep(tmp_path, f"worker{i}", "hydra.sweeper.n_trials=6", background=True, storage=storage)
             for i in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    study = optuna.load_study(study_name="mlp", storage=storage)
    ran = [trial_numbers_run(tmp_path / f"worker{i}") for i in range(2)]
    assert len(study.trials) == 6 == len(ran[0]) + len(ran[1])  # the count is the sum of both workers' trials
    assert sorted(ran[0] + ran[1]) == list(range(6))  # no trial ran twice
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({t.user_attrs["output_dir"] for t in study.trials}) == 6
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("vforge.sweep") == "parent"]  # both workers share one parent
    assert sum(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in runs) == 6


def test_a_journal_storage_file_works_like_a_database(tmp_path):
    url = f"journal:///{tmp_path}/other.log"
    make_sweeper(tmp_path, lambda v: v["x"], storage=url, n_trials=3).sweep([])
    make_sweeper(tmp_path, lambda v: v["x"], storage=url, n_trials=4).sweep([])
    study = optuna.load_study(study_name="fake", storage=S.open_storage(url))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4


def test_the_grid_sampler_visits_every_point_once(tmp_path):
    seen = []
    sweeper = make_sweeper(tmp_path, lambda v: seen.append((v["a"], v["b"])) or 0.0, n_trials=50,
                           sampler={"_target_": "optuna.samplers.GridSampler", "_partial_": True, "seed": 0},
                           params={"a": "choice(1, 2, 3)", "b": "range(0, 1)"})
    sweeper.sweep([])
    assert sorted(seen) == [(a, b) for a in (1, 2, 3) for b in (0, 1)]


def extend_space(cfg, trial):
    """A ``custom_search_space`` hook: a conditional parameter the override grammar cannot express."""
    if trial.params["x"] > 0.5:
        trial.suggest_int("depth", 1, 3)


def test_custom_search_space_adds_define_by_run_params(tmp_path):
    seen = []
    sweeper = make_sweeper(tmp_path, lambda v: seen.append(dict(v)) or v["x"], n_trials=6,
                           custom_search_space="tests.test_sweep.extend_space")
    sweeper.sweep([])
    assert all(("depth" in v) == (v["x"] > 0.5) for v in seen) and any("depth" in v for v in seen)


@pytest.mark.slow
def test_a_trial_whose_heartbeat_stops_is_failed_as_stale(tmp_path):
    import time

    study = S.create_study(f"sqlite:///{tmp_path}/hb.db", "hb", ["minimize"], heartbeat_interval=1, grace_period=1)
    trial = study.ask({"x": FloatDistribution(0, 1)})
    study._storage.record_heartbeat(trial._trial_id)  # what PruningCallback does every epoch
    time.sleep(2.5)
    assert S.fail_stale_trials(study) == [trial.number]
    first, retry = study.get_trials()
    assert first.state == TrialState.FAIL and first.user_attrs[S.ATTR_STALE]
    assert retry.state == TrialState.WAITING and retry.user_attrs[S.ATTR_RETRY_OF] == first.number


def test_a_study_refuses_a_sweep_it_was_not_made_for(tmp_path):
    """Continuing a study with other fixed overrides (other data) would report the first data's best trial."""
    url = f"journal:///{tmp_path}/made_for.log"
    make_sweeper(tmp_path, lambda v: v["x"], storage=url, n_trials=2).sweep(["data.n_days=40"])
    make_sweeper(tmp_path, lambda v: v["x"], storage=url, n_trials=3).sweep(["data.n_days=40", "logger=none",
                                                                           "trainer.num_threads=1"])  # continues
    with pytest.raises(ValueError) as info:
        make_sweeper(tmp_path, lambda v: v["x"], storage=url, n_trials=4).sweep(["data.n_days=80"])
    msg = str(info.value)
    assert "study 'fake'" in msg and "was made for another sweep" in msg and "data.n_days=80" in msg
    assert "hydra.sweeper.study_name=<new name>" in msg
    with pytest.raises(ValueError, match="space.x"):
        make_sweeper(tmp_path, lambda v: v["x"], storage=url, params={"x": "interval(0.0, 2.0)"}).sweep(
            ["data.n_days=40"])
    assert len(optuna.load_study(study_name="fake", storage=S.open_storage(url)).trials) == 3


def test_storage_null_makes_a_fresh_study_in_the_sweep_folder(tmp_path):
    for n_trials in (2, 3):
        make_sweeper(tmp_path, lambda v: v["x"], storage=None, n_trials=n_trials).sweep([])
    dbs = sorted((tmp_path / "sweep").glob("optuna*.db"))
    assert [p.name for p in dbs] == ["optuna-1.db", "optuna.db"]
    counts = sorted(len(optuna.load_study(study_name="fake", storage=f"sqlite:///{p}").trials) for p in dbs)
    assert counts == [2, 3]  # the second sweep ran its own trials instead of finding "2 of 3 done"
    summary = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    assert summary.name == "optuna" and summary.study_name == "fake" and "best_value" in summary
