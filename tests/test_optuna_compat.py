"""Compatibility with the official hydra-optuna-sweeper: its nine example-driven tests, written anew against our
plugin (apps in tests/optuna_apps/, run from the command line as a user of the official plugin runs them).

Each test launches a sweep of up to 20 trials in a subprocess (20-40 s on a busy 2-core machine), so they are
marked slow: ``python -m pytest -m slow tests/test_optuna_compat.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from omegaconf import DictConfig, OmegaConf

from vforge.sweeps.search_space import grid_search_space, parse_params

APPS = Path(__file__).resolve().parent / "optuna_apps"
ROOT = APPS.parents[1]


def sweep(app: str, tmp_path: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python <app> --multirun hydra.sweep.dir=<tmp> ...`` with this checkout's plugin and vforge."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    flags = [o for o in overrides if o.startswith("--")]  # --config-name=...: before the overrides
    cmd = [sys.executable, str(APPS / app), "--multirun", *flags, f"hydra.sweep.dir={tmp_path}",
           *(o for o in overrides if not o.startswith("--"))]
    out = subprocess.run(cmd, cwd=APPS, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def results(tmp_path: Path) -> DictConfig:
    out = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert isinstance(out, DictConfig) and out.name == "optuna"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("with_commandline", [True, False])
def test_single_objective_example(tmp_path, with_commandline):
    storage, name = f"sqlite:///{tmp_path / 'explicit.db'}", "compat-paraboloid"
    extra = ["x=choice(0, 1, 2)", "y=0"] if with_commandline else []  # y=0: a fixed value, not searched
    sweep("paraboloid.py", tmp_path, "hydra.job.chdir=True", "hydra.sweeper.n_trials=20", "hydra.sweeper.n_jobs=1",
          f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name={name}", "hydra/sweeper/sampler=tpe",
          "hydra.sweeper.sampler.seed=123", "~z", *extra)
    out = results(tmp_path)
    best = optuna.load_study(storage=storage, study_name=name).best_trial
    assert out.best_params.x == best.params["x"] and out.best_value == best.value
    if with_commandline:
        assert "y" not in out.best_params and "y" not in best.params
    else:
        assert out.best_params.y == best.params["y"]
    assert out.best_value <= 2.27  # TPE finds a point near the minimum in 20 trials (the official bound)


@pytest.mark.slow
@pytest.mark.parametrize("n_trials", [10, 1])
def test_grid_sampler_example(tmp_path, n_trials):
    sweep("paraboloid.py", tmp_path, "--config-name=grid", "hydra.job.chdir=False", f"hydra.sweeper.n_trials={n_trials}",
          "hydra.sweeper.n_jobs=1", f"hydra.sweeper.storage=sqlite:///{tmp_path / 'grid.db'}",
          "hydra.sweeper.study_name=compat-grid")
    out = results(tmp_path)
    assert out.best_params.x in (-1, 1) and out.best_params.y in (-1.0, 0.0) and out.best_params.z in ("foo", "bar")
    if n_trials >= 12:  # the whole grid (2 x 3 x 2): the minimum itself
        assert out.best_value == 1 and abs(out.best_params.x) == 1 and out.best_params.y == 0


def test_a_stepped_float_range_makes_a_grid_with_both_ends():
    assert grid_search_space(parse_params({"y": "range(-1.0, 1.0, step=1)"})[0]) == {"y": [-1.0, 0.0, 1.0]}


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


@pytest.mark.slow
@pytest.mark.parametrize("with_commandline", [True, False])
def test_multi_objective_example(tmp_path, with_commandline):
    extra = ["x=range(0, 5)", "y=range(0, 3)"] if with_commandline else []
    sweep("two_objectives.py", tmp_path, "hydra.job.chdir=True", "hydra.sweeper.n_trials=20", "hydra.sweeper.n_jobs=1",
          "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=123", *extra)
    solutions = results(tmp_path).solutions
    assert len(solutions) > 0
    steps = {0} if with_commandline else {0, 0.5}  # int ranges, or the YAML's step=0.5 ranges
    for a in solutions:
        assert a.params.x % 1 in steps and a.params.y % 1 in steps
        assert not any(_dominates(list(a["values"]), list(b["values"])) for b in solutions)  # a Pareto front


@pytest.mark.slow
def test_custom_search_space_example(tmp_path):
    sweep("conditional.py", tmp_path, "hydra.job.chdir=True", "hydra.sweeper.n_trials=20", "hydra.sweeper.n_jobs=1",
          "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=123", "max_z_difference_from_x=0.3")
    best = results(tmp_path).best_params
    assert abs(best.x - best.z) <= 0.3 and 0 <= best["+w"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("max_failure_rate", [0.5, 1.0])
def test_failure_rate(tmp_path, max_failure_rate):
    out = sweep("paraboloid.py", tmp_path, "hydra.job.chdir=True", "hydra.sweeper.n_trials=20", "hydra.sweeper.n_jobs=2",
                "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=123",
                f"hydra.sweeper.max_failure_rate={max_failure_rate}", "error=true", check=False)
    stopped = "RuntimeError: cfg.error is True" in out.stderr
    assert stopped == (max_failure_rate < 1.0), out.stderr[-3000:]
    assert (out.returncode != 0) == stopped


@pytest.mark.slow
def test_storage_null_is_a_fresh_study_each_sweep(tmp_path):
    """The official plugin's storage null is in memory: the same command run twice runs its trials twice."""
    for _ in range(2):
        sweep("paraboloid.py", tmp_path, "hydra.sweeper.n_trials=3")
    assert sorted(p.name for p in tmp_path.glob("optuna*.db")) == ["optuna-1.db", "optuna.db"]
    for db in tmp_path.glob("optuna*.db"):
        assert len(optuna.load_study(storage=f"sqlite:///{db}", study_name="paraboloid").trials) == 3
