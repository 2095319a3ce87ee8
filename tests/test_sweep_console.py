"""What a sweep prints and how its time budget stops it: one line per trial with an ETA, the job console kept quiet,
the running trial stopped (pruned) when the budget is spent, and the summary's verdict against persistence."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from vforge.sweeps import study as S
from vforge.sweeps.console import JobConsoleFilter, eta_seconds, format_duration, trial_line
from vforge.sweeps.pruning import ATTR_PRUNED_REASON, PruningCallback, TrialPruned

from .test_sweep import make_sweeper

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_durations_and_eta():
    assert format_duration(65) == "1:05" and format_duration(3725) == "1:02:05" and format_duration(-3) == "0:00"
    assert eta_seconds([10.0, 20.0], n_left=4) == 60.0  # the mean trial (15 s) x 4 trials left
    assert eta_seconds([10.0, 20.0], n_left=4, seconds_left=25.0) == 25.0  # the time budget ends first
    assert eta_seconds([], n_left=4, seconds_left=30.0) == 30.0 and eta_seconds([], n_left=4) is None


def test_a_trial_line_says_what_happened_and_how_far_the_sweep_is():
    line = trial_line(3, "PRUNED", {"model.d_block": 128, "optimizer.lr": 0.000312}, 0.61234, epoch=2,
                      reason="time budget spent", best=(1, 0.6), done=4, total=8, elapsed=130, eta=125)
    assert line == ("trial   3  val RMSE 0.6123 PRUNED at epoch 2 (time budget spent)  [d_block=128, lr=0.000312]"
                    " | best trial 1 0.6000 | 4/8 in 2:10, ETA 2:05")
    assert "FAILED: ValueError: bad" in trial_line(0, "FAIL", {}, None, reason="ValueError: bad")


def test_a_sweep_jobs_console_shows_warnings_sweeper_lines_and_the_first_data_report_only():
    def record(name, level=logging.INFO, **extra):
        r = logging.LogRecord(name, level, __file__, 1, "msg", None, None)
        r.__dict__.update(extra)
        return r

    first, later = JobConsoleFilter(first=True), JobConsoleFilter(first=False)
    epoch_line = record("vforge.training.callbacks")
    report = record("vforge.train", once_per_sweep=True)
    assert not first.filter(epoch_line) and not later.filter(epoch_line)
    assert first.filter(report) and not later.filter(report)
    assert later.filter(record("vforge.train", logging.WARNING)) and later.filter(record("vforge.sweeps.sweeper"))


def slow_job(values):
    """A job whose epochs would go on and on: only the sweep's time budget stops it, as train()'s loop would."""
    from vforge.sweeps.pruning import pruning_callback_from_env, raise_if_budget_spent

    cb = pruning_callback_from_env()
    assert cb is not None and cb.deadline is not None
    state = SimpleNamespace(epoch=0, metrics={}, stop=False)
    while not state.stop:  # the loop's test after each epoch's callbacks
        time.sleep(0.05)
        state.metrics = {"val/rmse_epoch": 1.0 / (1 + state.epoch)}
        cb.on_epoch_end(state)
        state.epoch += 1
    raise_if_budget_spent([cb])  # what main() does after train() returned
    raise AssertionError("a trial stopped by the budget must end pruned")


def test_the_time_budget_stops_the_running_trial_after_an_epoch_and_records_it_pruned(tmp_path, caplog):
    sweeper = make_sweeper(tmp_path, slow_job, timeout=0.5, n_jobs=1, n_trials=5)
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="vforge.sweeps"):
        sweeper.sweep([])
    assert time.monotonic() - start < 5  # the budget plus an epoch and the study's bookkeeping, not 5 endless trials
    study = optuna.load_study(study_name="fake", storage=S.open_storage(sweeper.storage_url))
    (trial,) = study.trials
    assert trial.state == TrialState.PRUNED and trial.user_attrs[ATTR_PRUNED_REASON] == "time budget spent"
    epoch = trial.user_attrs["pruned_epoch"]
    assert epoch >= 5 and trial.intermediate_values[epoch] == pytest.approx(1.0 / (1 + epoch))
    lines = [r.getMessage() for r in caplog.records if r.name == "vforge.sweeps.sweeper" and "trial " in r.getMessage()[:6]]
    assert len(lines) == 1 and f"PRUNED at epoch {epoch} (time budget spent)" in lines[0]


def test_a_deadline_in_the_past_stops_the_fit_at_the_epoch_end(tmp_path):
    from vforge.sweeps.pruning import raise_if_budget_spent

    study = S.create_study(f"journal:///{tmp_path}/d.log", "d", ["minimize"])
    cb = PruningCallback(study.ask(), deadline=time.time() - 1)
    state = SimpleNamespace(epoch=3, metrics={"val/rmse_epoch": 0.5}, stop=False)
    cb.on_epoch_end(state)
    assert state.stop and cb.budget_spent
    with pytest.raises(TrialPruned, match="time budget"):
        raise_if_budget_spent([cb])
    raise_if_budget_spent([PruningCallback(study.ask())])  # no deadline: nothing happens


def job_writing_metrics(values):
    """Completes with val/rmse = 1 + x next to a baseline of 1.05 (as train() writes metrics.json)."""
    trial = S.trial_from_env()
    out = Path("outputs/optuna")  # any folder (the test runs in tmp_path); the real job writes its run folder
    out = out / f"t{trial.number}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"val/rmse": 1 + values["x"], "val/baseline_rmse": 1.05}))
    trial.set_user_attr("output_dir", str(out))
    return 1 + values["x"]


def test_the_summary_says_when_the_best_trial_does_not_beat_persistence(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    for x_high, beats in ((0.02, True), (1.0, False)):
        sweeper = make_sweeper(tmp_path, job_writing_metrics, n_trials=3, study_name=f"b{x_high}",
                               params={"x": f"interval(0.0, {x_high})" if beats else "interval(0.5, 1.0)"})
        sweeper.config = OmegaConf.create({"optimized_metric": "val/rmse"})
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="vforge.sweeps"):
            sweeper.sweep([])
        (verdict,) = [r for r in caplog.records if r.getMessage().startswith("best val/rmse")]
        assert "vs 1.0500 for the baseline (persistence, else the previous surface)" in verdict.getMessage()
        assert ("does not beat" in verdict.getMessage()) is not beats
        assert verdict.levelno == (logging.INFO if beats else logging.WARNING)
        summary = OmegaConf.load(sweeper.sweep_dir / "optimization_results.yaml")
        assert summary.benchmark == verdict.getMessage()
