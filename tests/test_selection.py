"""AutoML's pick and ensemble evidence: weighted convex weights by hand, cross-fitting holds each block out,
capped row weights, the simplest-first pick against hand-made candidates, and the linear reference row equal to the
default command's model=linear."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from vforge.evaluation import leaderboard as L
from vforge.evaluation.ensemble import cross_fit, fit_weights
from vforge.evaluation.metrics import capped_row_weights
from vforge.evaluation.selection import candidates, pick
from vforge.train import train


def test_candidates_come_fallback_first_then_fewest_parameters_then_the_ensemble():
    size = {"linear": (10, 0.5), "ft": (900, 0.40), "mlp": (300, 0.45), "resnet": (300, 0.42)}
    order = candidates("linear", ["ft", "linear", "mlp", "resnet"], lambda n: size[n], "ensemble")
    assert order == ["linear", "resnet", "mlp", "ft", "ensemble"]  # equal sizes: the lower validation RMSE first
    assert candidates("baseline", ["mlp"], lambda n: size[n], None) == ["baseline", "mlp"]


def test_row_weights_move_convex_weights_as_the_closed_form_says():
    # members a = [1, 0], b = [0, 1] against y = 0: weighted MSE s1 w^2 + s2 (1 - w)^2, minimum at w = s2 / (s1 + s2)
    preds, y = np.array([[1.0, 0.0], [0.0, 1.0]]), np.zeros(2)
    assert fit_weights(preds, y) == pytest.approx([0.5, 0.5], abs=1e-6)
    assert fit_weights(preds, y, np.array([3.0, 1.0])) == pytest.approx([0.25, 0.75], abs=1e-6)
    assert fit_weights(preds, y, np.array([0.0, 1.0])) == pytest.approx([1.0, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="sample_weight must be"):
        fit_weights(preds, y, np.array([-1.0, 1.0]))


def test_cross_fit_predicts_each_block_with_weights_fit_on_the_others():
    # two dates: member a is exact on date 1, b on date 0; held out, date 0 gets a's weights and date 1 b's
    y = np.array([0.20, 0.21, 0.30, 0.31])
    a = y + np.array([0.05, 0.05, 0.0, 0.0])
    b = y + np.array([0.0, 0.0, 0.04, 0.04])
    dates = np.array([0, 0, 1, 1])
    out = cross_fit(np.stack([a, b], axis=1), y, dates, n_blocks=2)
    assert out == pytest.approx(np.concatenate([a[:2], b[2:]]))
    # in sample the ensemble is better than either member; held out it is worse than both here
    w = fit_weights(np.stack([a, b], axis=1), y)
    assert np.mean((np.stack([a, b], axis=1) @ w - y) ** 2) < min(np.mean((a - y) ** 2), np.mean((b - y) ** 2))
    assert np.mean((out - y) ** 2) > max(np.mean((a - y) ** 2), np.mean((b - y) ** 2))


def test_capped_row_weights_scale_a_jump_date_down_to_the_cap_quantile():
    # per-date persistence losses 1, 4 and 100 (one row each, the change squared): the 0.5 quantile is 4
    change, dates = np.array([1.0, 2.0, 10.0]), np.array([5, 6, 7])
    assert capped_row_weights(change, dates, 0.5) == pytest.approx([1.0, 1.0, 0.04])
    # rows of a date share its weight; a date's loss is the sum over its rows (2 x 5^2 = 50)
    w = capped_row_weights(np.array([1.0, 5.0, 5.0]), np.array([0, 1, 1]), 0.0)
    assert w == pytest.approx([1.0, 1 / 50, 1 / 50])


def panel(n_dates=60, rows=20, seed=0):
    rng = np.random.default_rng(seed)
    dates = np.repeat(np.arange(n_dates), rows)
    signal = rng.normal(0, 0.01, dates.size)
    true = 0.2 + signal + rng.normal(0, 0.005, dates.size)
    return rng, dates, signal, np.full(dates.size, 0.2), true


def test_the_pick_keeps_the_simplest_unless_a_candidate_wins_clearly():
    rng, dates, signal, base, true = panel()
    good = base + 0.9 * signal
    noisy = good + rng.normal(0, 0.002, dates.size)  # a more complex candidate, a little worse
    p = pick(["fallback", "good", "noisy"], [base, good, noisy], true, base, dates, tolerance=0.005, max_p=0.05,
             cap=0.9)
    assert p.name == "good" and p.index == 1
    assert p.scores["fallback"] == pytest.approx(1.0)  # no change: persistence's own loss
    assert p.why["good"].startswith("replaced fallback") and p.why["noisy"].startswith("did not earn its place over good")
    same = pick(["fallback", "good", "copy"], [base, good, good.copy()], true, base, dates, tolerance=0.005,
                max_p=0.05, cap=0.9)
    assert same.name == "good" and same.why["copy"] == "the same validation predictions as good"
    # a gain on 3 of 4 dates, lost on the fourth, is not evidence though the score is far better; a score within
    # the tolerance is not a gain
    few = dates < 4
    mixed = np.where(dates == 3, base - 0.3 * signal, good)
    p = pick(["fallback", "mixed"], [base[few], mixed[few]], true[few], base[few], dates[few], tolerance=0.005,
             max_p=0.05, cap=0.9)
    assert p.name == "fallback" and p.scores["mixed"] < 0.8 and "won 3/4 validation dates" in p.why["mixed"]
    close = base + 0.02 * signal
    p = pick(["fallback", "close"], [base, close], true, base, dates, tolerance=0.05, max_p=0.05, cap=0.9)
    assert p.scores["close"] < 1.0 and p.name == "fallback"


def test_a_candidate_that_only_undoes_one_jump_is_not_picked():
    # one validation date jumps by 20 vol points and the candidate "predicts" it; on every other date it is noise
    rng, dates, _, base, true = panel(seed=1)
    true = true.copy()
    true[dates == 30] += 0.2
    jumpy = base + rng.normal(0, 0.01, dates.size)
    jumpy[dates == 30] += 0.2
    pooled = np.mean((jumpy - true) ** 2) / np.mean((base - true) ** 2)
    assert pooled < 0.5  # an uncapped pooled score would take it
    p = pick(["fallback", "jumpy"], [base, jumpy], true, base, dates, tolerance=0.005, max_p=0.05, cap=0.9)
    assert p.name == "fallback" and p.scores["jumpy"] > 1.0


def test_pick_scores_on_the_rows_given():
    rng, dates, signal, base, true = panel(seed=2)
    good = base + 0.9 * signal
    rows = dates % 2 == 0
    bad_elsewhere = np.where(rows, good, base + 0.05)  # good on the given rows, absurd on the others
    p = pick(["fallback", "c"], [base, bad_elsewhere], true, base, dates, rows, tolerance=0.005, max_p=0.05, cap=0.9)
    assert p.name == "c"
    with pytest.raises(ValueError, match="2 names for 1 predictions"):
        pick(["a", "b"], [base], true, base, dates, tolerance=0.0, max_p=0.05, cap=0.9)


def test_the_linear_reference_row_is_the_default_commands_model_linear(make_cfg):
    cfg = make_cfg("model=linear")
    metrics = train(cfg)
    entry, data = L.model_entry("linear", cfg.output_dir, None, latency_rows=50)
    config = OmegaConf.to_container(cfg, resolve=True)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    row = L.linear_entry(data, config, model_cfg, latency_rows=50)
    assert row.name == "linear" and row.kind == "reference" and row.n_params > 0
    for split in ("val", "test"):
        assert getattr(row, f"{split}_pred") == pytest.approx(getattr(entry, f"{split}_pred"), abs=1e-6)
    assert row.test["prev_quoted_rmse"] == pytest.approx(metrics["test/prev_quoted_rmse"], rel=1e-5)
    assert "model=linear" in row.info["notes"]


def test_a_candidate_equal_on_quoted_rows_wins_on_new_contracts_only_with_evidence():
    rng, dates, signal, base, true = panel(seed=3)
    quoted = np.arange(dates.size) % 2 == 0
    better_new = np.where(quoted, base, base + 0.9 * signal)  # the fallback's own on quoted rows, better elsewhere
    p = pick(["fallback", "c"], [base, better_new], true, base, dates, quoted, tolerance=0.005, max_p=0.05, cap=0.9)
    assert p.name == "c" and "all rows: score" in p.why["c"] and p.scores["c"] == pytest.approx(1.0)
    # worse on the quoted rows: better new contracts do not make up for it
    worse_quoted = np.where(quoted, base - 0.5 * signal, base + 0.9 * signal)
    p = pick(["fallback", "c"], [base, worse_quoted], true, base, dates, quoted, tolerance=0.005, max_p=0.05, cap=0.9)
    assert p.name == "fallback" and "all rows" not in p.why["c"]
