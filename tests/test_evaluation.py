"""Evaluation: the DM test against a hand computation, per-date tables, walk-forward folds and runs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate
from scipy import stats

from vforge.evaluation import significance as sig
from vforge.evaluation.tables import per_date_table
from vforge.evaluation.walk_forward import fold_configs


def test_diebold_mariano_matches_a_hand_computation():
    model = np.array([1.0, 2.0, 0.5, 1.5, 1.0, 0.8, 2.2, 1.1])
    bench = np.array([1.5, 2.1, 1.5, 1.4, 2.0, 1.0, 2.0, 2.1])
    d = model - bench  # -0.5 -0.1 -1.0 0.1 -1.0 -0.2 0.2 -1.0
    T, dbar = 8, d.mean()
    gamma = [sum((d[t] - dbar) * (d[t - k] - dbar) for t in range(k, T)) / T for k in range(3)]
    lags = 2  # floor(8 ** (1/3))
    lrv = gamma[0] + sum(2 * (1 - k / (lags + 1)) * gamma[k] for k in range(1, lags + 1))
    dm = dbar / math.sqrt(lrv / T) * math.sqrt((T + 1 - 2 * 1 + 0) / T)  # HLN with h = 1
    got = sig.diebold_mariano(model, bench, horizon=1)
    assert got.n_dates == T and got.mean_diff == pytest.approx(-0.4375)
    assert got.stat == pytest.approx(dm, rel=1e-12)
    assert got.pvalue == pytest.approx(stats.t.cdf(dm, df=T - 1), rel=1e-12)
    assert got.pvalue < 0.05  # the model's loss is lower on 6 of 8 dates, by much more than the noise
    swapped = sig.diebold_mariano(bench, model)  # one-sided: the benchmark "beating" the model is not significant
    assert swapped.stat == pytest.approx(-got.stat) and swapped.pvalue == pytest.approx(1 - got.pvalue)
    assert math.isnan(sig.diebold_mariano(model[:2], bench[:2]).stat)  # too few dates
    same = sig.diebold_mariano(bench, bench)  # the benchmark itself: no evidence either way, not NaN
    assert (same.stat, same.pvalue) == (0.0, 0.5)


def test_compare_averages_squared_errors_per_date_and_counts_dates_won():
    dates = np.array(["d1", "d1", "d2", "d2", "d3"])
    true = np.full(5, 0.20)
    pred = np.array([0.21, 0.19, 0.20, 0.22, 0.23])  # errors 1, -1, 0, 2, 3 vol points
    bench = np.array([0.22, 0.20, 0.21, 0.21, 0.20])  # errors 2, 0, 1, 1, 0
    per_date = sig.per_date_sq_errors(dates, pred, bench, true)
    np.testing.assert_allclose(per_date["model"], [1.0, 2.0, 9.0])  # (1 + 1) / 2, (0 + 4) / 2, 9
    np.testing.assert_allclose(per_date["bench"], [2.0, 1.0, 0.0])
    dm, won = sig.compare(dates, pred, bench, true)
    assert won == pytest.approx(1 / 3)
    assert dm.mean_diff == pytest.approx((-1 + 1 + 9) / 3)
    _, won_masked = sig.compare(dates, pred, bench, true, mask=np.array([True, False, True, True, True]))
    assert won_masked == pytest.approx(1 / 3)  # d1 on its first row only: 1 vs 4


def test_per_date_table_scores_persistence_on_previously_quoted_rows_only():
    frame = pd.DataFrame({
        "target_date": pd.to_datetime(["2024-01-02"] * 3 + ["2024-01-03"] * 2),
        "option_type": ["C"] * 5, "prev_quoted": [True, True, False, True, True],
        "market": [0.20] * 5, "model": [0.21, 0.20, 0.25, 0.20, 0.20],
        "baseline": [0.22, 0.20, 0.30, 0.21, 0.19], "persistence": [0.22, 0.20, np.nan, 0.21, 0.19],
    })
    t = per_date_table(frame)
    assert t["rows"].tolist() == [3, 2] and t["prev_quoted_rows"].tolist() == [2, 2]
    np.testing.assert_allclose(t["model_rmse"], [np.sqrt((1 + 0 + 25) / 3), 0.0])
    np.testing.assert_allclose(t["baseline_rmse"], [np.sqrt((4 + 0 + 100) / 3), 1.0])
    np.testing.assert_allclose(t["persistence_rmse"], [np.sqrt(4 / 2), 1.0])
    np.testing.assert_allclose(t["model_prev_quoted_rmse"], [np.sqrt(1 / 2), 0.0])
    assert t["beats_persistence"].tolist() == [True, True]


@pytest.mark.parametrize("horizon,train_dates", [(1, None), (0, 12)])
def test_walk_forward_folds_never_train_on_a_date_at_or_after_their_test_block(make_cfg, horizon, train_dates):
    cfg = make_cfg("evaluation=walk_forward", "evaluation.n_folds=3", "data.test_fraction=0.1",
                   f"data.horizon={horizon}", f"data.train_dates={'null' if train_dates is None else train_dates}")
    tests = []
    for c in fold_configs(cfg):
        ds = instantiate(c.data, _convert_="all")
        train, val, test = (pd.DatetimeIndex(getattr(ds, s).rows["target_date"]) for s in ("train", "val", "test"))
        info_val, info_test = (pd.DatetimeIndex(getattr(ds, s).rows["info_date"]) for s in ("val", "test"))
        assert train.max() < val.min() <= val.max() < test.min()
        # the embargo: what validation and test read (their info dates) comes after the last training target
        assert (info_val > train.max()).all() if horizon else True
        assert (info_test > val.max()).all() if horizon else True
        if train_dates:
            assert train.nunique() == train_dates
        tests.append(test)
    assert all(a.max() < b.min() for a, b in zip(tests, tests[1:]))  # consecutive, non-overlapping test blocks
    assert tests[-1].max() == pd.DatetimeIndex(ds.test.rows["target_date"]).max()  # the last fold ends at the data's end


@pytest.mark.slow
def test_walk_forward_run_logs_a_parent_with_one_child_per_fold(make_cfg, mlflow_uri):
    mlflow = pytest.importorskip("mlflow")
    from vforge.train import train

    cfg = make_cfg("evaluation=walk_forward", "evaluation.n_folds=2", "data.test_fraction=0.1", "trainer.max_epochs=1",
                   "logger=mlflow", f"logger.tracking_uri={mlflow_uri}", "logger.experiment=test-wf")
    metrics = train(cfg)
    for key in ("wf/rmse", "wf/prev_quoted_rmse", "wf/persistence_rmse", "wf/baseline_rmse", "wf/dm_pvalue",
                "wf/dates_beaten", "val/rmse"):
        assert math.isfinite(metrics[key]), key
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("test-wf").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("vforge.evaluation") == "walk_forward"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert parent.data.metrics["wf/dm_pvalue"] == pytest.approx(metrics["wf/dm_pvalue"])
    tables = {a.path for a in client.list_artifacts(parent.info.run_id, "tables")}
    assert {"tables/folds.csv", "tables/per_date.csv"} <= tables
    # the concatenated predictions are the folds' own test predictions
    child_rmse = sorted(r.data.metrics["test/rmse"] for r in children)
    assert min(child_rmse) <= metrics["wf/rmse"] <= max(child_rmse)


def surface_frame(vol, *, taus=(0.1, 0.3, 0.6), both_types=False) -> pd.DataFrame:
    """One date's rows at forward 100 on expiries ``taus`` x 13 log-moneyness in [-0.3, 0.3], IV ``vol(k, tau, opt)``."""
    ks = np.linspace(-0.3, 0.3, 13)
    rows = []
    for tau in taus:
        for k in ks:
            for opt in ("C", "P") if both_types else ("C",):
                rows.append({"target_date": pd.Timestamp("2024-01-02"), "expiry": pd.Timestamp("2024-01-02")
                             + pd.Timedelta(days=round(tau * 365)), "strike": 100 * np.exp(k), "option_type": opt,
                             "forward": 100.0, "tau": tau, "log_moneyness": k, "iv": vol(k, tau, opt)})
    return pd.DataFrame(rows)


def test_arbitrage_counters_pass_a_clean_surface_and_catch_each_violation():
    from vforge.evaluation import arbitrage as arb
    from vforge.evaluation.ssvi import total_variance

    # An SSVI surface inside the no-arbitrage constraints: no violation of either kind, no call/put gap.
    theta = lambda tau: 0.04 * tau  # noqa: E731
    ssvi = lambda k, tau, opt: np.sqrt(total_variance(k, theta(tau), -0.5, 1.0, 0.4) / tau)  # noqa: E731
    clean = arb.summary(arb.per_date(surface_frame(ssvi, both_types=True), "iv"))
    assert clean == {"arb_calendar": 0.0, "arb_butterfly": 0.0, "cp_gap_vol_pts": 0.0}

    # Calendar: the last expiry's total variance falls below the one before it (vol 0.2, 0.2, then 0.1).
    cal = lambda k, tau, opt: 0.2 if tau < 0.5 else 0.1  # noqa: E731
    got = arb.per_date(surface_frame(cal), "iv")
    assert got["calendar_checks"].iloc[0] == 26 and got["calendar_violations"].iloc[0] == 13  # 2 pairs x 13; 1 fails
    assert got["butterfly_violations"].iloc[0] == 0  # flat smiles are convex

    # Butterfly: a spike in one strike's vol makes its call price stick out above the chord of its neighbours.
    spike = lambda k, tau, opt: 0.2 + (0.15 if abs(k) < 1e-9 else 0.0)  # noqa: E731
    got = arb.per_date(surface_frame(spike), "iv")
    assert got["butterfly_violations"].iloc[0] == 3  # the ATM triple on each of the three expiries
    assert got["butterfly_checks"].iloc[0] == 3 * 11

    # Call/put gap: puts 1 vol point above calls at every strike.
    gap = lambda k, tau, opt: 0.2 + (0.01 if opt == "P" else 0.0)  # noqa: E731
    assert arb.summary(arb.per_date(surface_frame(gap, both_types=True), "iv"))["cp_gap_vol_pts"] == pytest.approx(1.0)


def test_ssvi_fit_recovers_the_parameters_of_surfaces_it_generated():
    from vforge.evaluation import ssvi as S

    taus = np.array([0.04, 0.12, 0.3, 0.6, 1.1])
    truth = [dict(rho=-0.65, eta=1.05, gamma=0.3, theta=0.04 * taus * (1 + 0.3 * taus)),
             dict(rho=-0.2, eta=0.6, gamma=0.45, theta=0.09 * taus)]
    date, tau, k, iv = [], [], [], []
    for d, p in enumerate(truth):
        for t, th in zip(taus, p["theta"]):
            kk = np.linspace(-0.5, 0.3, 17) * np.sqrt(t)
            date += [d] * len(kk); tau += [t] * len(kk); k += list(kk)  # noqa: E702
            iv += list(np.sqrt(S.total_variance(kk, th, p["rho"], p["eta"], p["gamma"]) / t))
    fit = S.fit(np.array(date), np.array(tau), np.array(k), np.array(iv))
    for d, p in enumerate(truth):
        assert fit.rho[d] == pytest.approx(p["rho"], abs=1e-4)
        assert fit.eta[d] == pytest.approx(p["eta"], rel=1e-3)
        assert fit.gamma[d] == pytest.approx(p["gamma"], abs=1e-3)
        np.testing.assert_allclose(fit.theta[d], p["theta"], rtol=1e-4)
        assert fit.eta[d] * (1 + abs(fit.rho[d])) <= 2 and 0 < fit.gamma[d] <= 0.5  # the no-arbitrage constraints
    # evaluated between expiries: theta linear in time, the smile shape of the date
    mid = 0.5 * (taus[1] + taus[2])
    th = np.interp(mid, taus, truth[0]["theta"])
    want = np.sqrt(S.total_variance(0.05, th, truth[0]["rho"], truth[0]["eta"], truth[0]["gamma"]) / mid)
    assert S.implied_vol(fit, np.array([0]), np.array([0.05]), np.array([mid]))[0] == pytest.approx(want, rel=1e-4)
    assert np.isnan(S.implied_vol(fit, np.array([7]), np.array([0.0]), np.array([0.1]))[0])  # a date not fit


def test_ssvi_fit_of_a_saturating_date_stays_finite():
    import json
    import warnings
    from pathlib import Path

    from vforge.evaluation import ssvi as S

    # A calls-only messy date whose fit drove rho to -1 and eta to 0 (phi / eta = 0 / 0 in the Jacobian: NaN, stuck).
    q = json.loads((Path(__file__).parent / "data" / "ssvi_calls_only_date.json").read_text())
    tau, k, iv = (np.array(q[c]) for c in ("tau", "log_moneyness", "iv"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fit = S.fit(np.zeros(len(k)), tau, k, iv)
    assert np.isfinite(fit.rmse[0]) and fit.rmse[0] < 0.1 and abs(fit.rho[0]) < 1 and fit.eta[0] > 0
    assert np.isfinite(S.implied_vol(fit, np.zeros(len(k)), k, tau)).all()


def test_a_run_leaves_plots_predictions_and_the_new_metrics(make_cfg):
    from pathlib import Path

    from vforge.train import train

    # the network itself (do no harm off): on the tiny market the step may fall back to persistence, whose dates
    # won against itself are undefined
    cfg = make_cfg("trainer.max_epochs=1", "evaluation.plots=true", "do_no_harm.enabled=false")
    metrics = train(cfg)
    for key in ("test/dm_pvalue", "test/dates_beaten", "test/arb_calendar", "test/arb_butterfly", "test/ssvi_rmse",
                "test/cp_gap_vol_pts", "test/market_arb_calendar", "test/persistence_arb_butterfly"):
        assert math.isfinite(metrics[key]), key
    assert metrics["test/ssvi_arb_butterfly"] == 0.0  # SSVI's constraints hold on the evaluated surfaces
    out = Path(cfg.output_dir)
    assert len(list((out / "plots").glob("*.png"))) >= 5
    test = pd.read_parquet(out / "predictions" / "test.parquet")
    assert {"market", "model", "baseline", "persistence", "ssvi", "expiry", "strike"} <= set(test.columns)
    rmse = np.sqrt(np.mean((test["model"] - test["market"]) ** 2)) * 100
    assert rmse == pytest.approx(metrics["test/rmse"], rel=1e-6)
