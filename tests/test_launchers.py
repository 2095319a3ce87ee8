"""Cluster launchers on this machine (slow): a 2-trial Optuna sweep through Hydra's Ray launcher (a local Ray
instance, stopped with the sweep) and the submitit launcher (its local executor: Slurm's code path, subprocesses)."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from tests.test_sweep import run_sweep, trial_numbers_run

LAUNCHERS = {
    "ray": ("hydra_plugins.hydra_ray_launcher", ["hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2",
                                                 "+hydra.launcher.ray.init.include_dashboard=false",
                                                 "+hydra.launcher.ray.remote.num_cpus=1"]),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", ["hydra/launcher=submitit_local",
                                                                 "hydra.launcher.cpus_per_task=1"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_a_sweep_runs_its_trials_through_a_cluster_launcher(tmp_path, launcher):
    module, overrides = LAUNCHERS[launcher]
    pytest.importorskip(module, reason="the cluster launchers are an extra: pip install -e '.[cluster]'")
    log = run_sweep(tmp_path, "sweep", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", *overrides)
    assert "study 'mlp': 2 complete" in log
    study = optuna.load_study(study_name="mlp", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert sorted(trial_numbers_run(tmp_path / "sweep")) == [0, 1]
    assert len(list((tmp_path / "sweep").glob("*/metrics.json"))) == 2  # each job wrote its own folder
