"""scripts/results_page.py (the README's results page): pooled scores and the table by hand, the cache and the
fold-level resume, AutoML's pick on hand-made folds, and (slow) one tiny walk-forward of linear, LightGBM, their
ensemble and the pick through the real code."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vforge.evaluation import leaderboard as L
from vforge.evaluation.metrics import capped_row_weights
from vforge.evaluation.significance import diebold_mariano

from .conftest import TINY_DATA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import results_page as R  # noqa: E402


def four_dates() -> pd.DataFrame:
    """4 dates x (one previously quoted row, one new contract); market 20%. Quoted rows: persistence off by 1 vol
    point, the model by 0.5, 0.5, 2, 0.5; new rows: the baseline off by 3, the model by 1, SSVI by 2 (one missing)."""
    dates = pd.to_datetime(["2024-01-02", "2024-01-03", "2024-01-04", "2024-01-05"])
    rows = []
    for i, d in enumerate(dates):
        e_model = [0.5, 0.5, 2.0, 0.5][i]
        rows.append({"target_date": d, "prev_quoted": True, "market": 0.20, "model": 0.20 + e_model / 100,
                     "persistence": 0.21, "baseline": 0.21, "ssvi": 0.22})
        rows.append({"target_date": d, "prev_quoted": False, "market": 0.20, "model": 0.21, "persistence": np.nan,
                     "baseline": 0.23, "ssvi": np.nan if i == 3 else 0.18})
    return pd.DataFrame(rows)


def test_pooled_scores_of_a_column_match_a_hand_computation():
    s = R.scores(four_dates(), "model")
    assert s["prev_rmse"] == pytest.approx(math.sqrt((3 * 0.25 + 4.0) / 4))
    assert s["persistence_rmse"] == pytest.approx(1.0)
    assert s["all_rmse"] == pytest.approx(math.sqrt((3 * 0.25 + 4.0 + 4 * 1.0) / 8))
    assert s["baseline_rmse"] == pytest.approx(math.sqrt((4 * 1.0 + 4 * 9.0) / 8))
    assert s["won"] == 0.75  # the model's error is below persistence's on 3 of the 4 dates
    assert s["baseline_won"] == 1.0  # per date (0.25 + 1) / 2 or, on date 3, (4 + 1) / 2 against (1 + 9) / 2
    dm = diebold_mariano(np.array([0.25, 0.25, 4.0, 0.25]), np.ones(4), horizon=1)
    assert s["dm_p"] == pytest.approx(dm.pvalue) and s["n_dates"] == 4 and s["prev_rows"] == 4 and s["rows"] == 8
    ssvi = R.scores(four_dates(), "ssvi")  # the missing SSVI row leaves both sides
    assert ssvi["missing_rows"] == 1 and ssvi["rows"] == 7
    assert ssvi["all_rmse"] == pytest.approx(math.sqrt((4 * 4.0 + 3 * 4.0) / 7))
    assert ssvi["baseline_rmse"] == pytest.approx(math.sqrt((4 * 1.0 + 3 * 9.0) / 7))
    pers = R.scores(four_dates(), "persistence")  # no all-row score, and no test against itself
    assert math.isnan(pers["all_rmse"]) and math.isnan(pers["won"]) and pers["prev_rmse"] == pytest.approx(1.0)


def record(name, prev, all_, dm=0.5, won=math.nan, bdm=0.5, bwon=math.nan, folds=(), commit="abc1234"):
    s = {"prev_rmse": prev, "persistence_rmse": 2.0, "all_rmse": all_, "baseline_rmse": 3.0, "dm_p": dm, "won": won,
         "baseline_dm_p": bdm, "baseline_won": bwon, "n_dates": 100.0, "rows": 1000.0, "prev_rows": 900.0,
         "missing_rows": 0.0}
    same = {"dm_p": 0.5, "won": math.nan, "baseline_dm_p": 0.5, "baseline_won": math.nan}  # as scores() gives them
    return {"data": "d", "name": name, "scores": s, "folds": list(folds), "commit": commit, "overrides": [],
            "load": [1.0, 2.0], "references": {"persistence": {**s, **same, "prev_rmse": 2.0, "all_rmse": math.nan},
                                               "baseline": {**s, **same, "prev_rmse": 2.0, "all_rmse": 3.0}}}


def test_the_table_of_fake_cells_reads_as_computed_by_hand():
    gate = [{"w_model": 0.0, "w_linear": 0.0, "w_model_new": 1.0, "w_linear_new": 0.0},
            {"w_model": 0.5, "w_linear": 0.25, "w_model_new": 0.0, "w_linear_new": 1.0}]
    cells = {"linear": record("linear", 1.8, 2.7, dm=0.0004, won=0.6, bdm=0.02, bwon=0.7, folds=gate),
             "lightgbm": record("lightgbm", 2.2, 3.3, dm=0.9, won=0.4, bdm=0.95, bwon=0.3),
             "ensemble": record("ensemble", 1.7, 2.4, dm=0.01, won=0.65, bdm=0.001, bwon=0.8,
                                folds=[{"w_mlp": 0.6, "w_linear": 0.4, "w_resnet": 0.0}, {"w_linear": 1.0}])}
    text = R.markdown_table(R.page_rows(cells, ["linear", "lightgbm", "mlp", "ensemble"]))
    lines = text.splitlines()
    assert lines[2] == "| persistence | 2.000 | 1.000x | - | - | - | - | - |  | abc1234 |"
    assert lines[3] == "| baseline | 2.000 | 1.000x | - | - | 3.000 | 1.000x | - |  | abc1234 |"
    assert lines[4] == "| linear | 1.800 | 0.900x | < 0.001 | 60% | 2.700 | 0.900x | 0.020 | p, 0.5m+0.25r / m, r | abc1234 |"
    assert lines[5] == "| LightGBM | 2.200 | 1.100x | 0.900 | 40% | 3.300 | 1.100x | 0.950 | not gated | abc1234 |"
    assert lines[6] == "| mlp | not run | | | | | | | | |"
    assert lines[7] == ("| ensemble | 1.700 | 0.850x | 0.010 | 65% | 2.400 | 0.800x | 0.001 | mlp 0.60 linear 0.40; "
                        "linear 1.00 | abc1234 |")
    other = record("lightgbm", 2.2, 3.3)
    other["references"]["persistence"]["persistence_rmse"] = 2.5  # scored on other rows: not one table
    with pytest.raises(ValueError, match="scored persistence on other rows: linear 2.000000, lightgbm 2.500000"):
        R.page_rows({"linear": cells["linear"], "lightgbm": other}, ["linear", "lightgbm"])


def test_a_cached_cell_is_not_computed_again_and_an_ensemble_with_other_members_is(tmp_path):
    calls = []

    def compute(name):
        def run():
            calls.append(name)
            (tmp_path / "d" / name).mkdir(parents=True, exist_ok=True)
            rec = {"name": name, "members": ["linear", "mlp"] if name == "ensemble" else []}
            (tmp_path / "d" / name / "cell.json").write_text(json.dumps(rec))
            return rec
        return run

    assert R.cached_cell("d", "linear", tmp_path, compute("linear"))["name"] == "linear"
    assert R.cached_cell("d", "linear", tmp_path, compute("linear"))["name"] == "linear"
    assert calls == ["linear"]
    R.cached_cell("d", "ensemble", tmp_path, compute("ensemble"), members=["mlp", "linear"])
    R.cached_cell("d", "ensemble", tmp_path, compute("ensemble"), members=["linear", "mlp"])
    assert calls == ["linear", "ensemble"]
    R.cached_cell("d", "ensemble", tmp_path, compute("ensemble"), members=["linear", "mlp", "resnet"])
    assert calls == ["linear", "ensemble", "ensemble"]


def test_a_finished_fold_is_read_back_and_an_unfinished_one_runs_again(tmp_path):
    calls = []

    def fold_fn(cfg, callbacks=()):
        out = Path(cfg.output_dir)
        calls.append(out.name)
        (out / "predictions").mkdir(parents=True, exist_ok=True)
        for s in ("val", "test"):
            (out / "predictions" / f"{s}.parquet").write_text("")
        (out / "metrics.json").write_text(json.dumps({"val/rmse": 1.5}))
        return {"val/rmse": 1.5}

    run = R.reusing(fold_fn)
    cfgs = [OmegaConf.create({"output_dir": str(tmp_path / f"fold_{i}")}) for i in range(2)]
    assert run(cfgs[0]) == {"val/rmse": 1.5} and calls == ["fold_0"]
    assert run(cfgs[0]) == {"val/rmse": 1.5} and calls == ["fold_0"]  # read back
    (tmp_path / "fold_1" / "predictions").mkdir(parents=True)  # killed before its metrics.json
    (tmp_path / "fold_1" / "predictions" / "val.parquet").write_text("")
    run(cfgs[1])
    assert calls == ["fold_0", "fold_1"]


def test_a_cell_refuses_folds_run_with_other_overrides(tmp_path):
    (tmp_path / "synthetic" / "mlp").mkdir(parents=True)
    (tmp_path / "synthetic" / "mlp" / "overrides.json").write_text(json.dumps(["data=synthetic", "model=mlp"]))
    with pytest.raises(ValueError, match=r"holds folds run with other overrides .*--rerun mlp"):
        R.run_cell("synthetic", "mlp", tmp_path, [])


@pytest.mark.slow  # ~20-30 s: three tiny walk-forwards with their SSVI fits
def test_linear_lightgbm_and_their_ensemble_walk_forward_on_a_tiny_market(tmp_path, cache_dir):
    pytest.importorskip("lightgbm")
    extra = [*TINY_DATA, "trainer=fast", "data.test_fraction=0.1", f"data.cache_dir={cache_dir}"]
    lin = R.run_cell("synthetic", "linear", tmp_path, extra, n_folds=2)
    metrics = json.loads((tmp_path / "synthetic" / "linear" / "metrics.json").read_text())
    assert lin["scores"]["all_rmse"] == pytest.approx(metrics["wf/rmse"])  # the page's number is the run's
    assert lin["scores"]["dm_p"] == pytest.approx(metrics["wf/dm_pvalue"])
    assert lin["references"]["persistence"]["prev_rmse"] == pytest.approx(metrics["wf/persistence_rmse"])
    assert {"w_model", "w_linear", "w_model_new", "w_linear_new"} <= set(lin["folds"][0])
    lgb = R.run_cell("synthetic", "lightgbm", tmp_path, extra, n_folds=2)
    # fold 1's test predictions are the leaderboard's LightGBM fit on that fold's data
    cfg = R.compose_cell(R.cell_overrides("synthetic", "lightgbm", 2, [*extra, "data.n_folds=2", "data.fold=1"]),
                         tmp_path / "x", "lightgbm")
    fit = L.lightgbm_fit(instantiate(cfg.data, _convert_="all"), n_threads=1)
    assert fit is not None
    test = pd.read_parquet(tmp_path / "synthetic" / "lightgbm" / "fold_1" / "predictions" / "test.parquet")
    np.testing.assert_allclose(test["model"], fit.pred["test"], rtol=0, atol=1e-12)
    for k in ("prev_rmse", "rows", "prev_rows", "baseline_rmse"):  # the same rows in both cells
        assert lgb["references"]["persistence"][k] == lin["references"]["persistence"][k], k
    members = {"linear": tmp_path / "synthetic" / "linear", "lightgbm": tmp_path / "synthetic" / "lightgbm"}
    ens = R.run_cell("synthetic", "ensemble", tmp_path, extra, n_folds=2, members=members)
    for i, fold in enumerate(ens["folds"]):
        val = {n: pd.read_parquet(d / f"fold_{i}" / "predictions" / "val.parquet") for n, d in
               {**members, "ensemble": tmp_path / "synthetic" / "ensemble"}.items()}
        v = val["ensemble"]
        w = capped_row_weights((v["market"] - v["baseline"]).to_numpy(), v["target_date"].to_numpy(), 0.9)
        mse = {n: float(np.sum(w * (f["model"] - f["market"]) ** 2)) for n, f in val.items()}
        mse["baseline"] = float(np.sum(w * (v["baseline"] - v["market"]) ** 2))
        # weights fit on the capped validation rows: never worse there than its best member (baseline included)
        assert mse["ensemble"] <= min(mse[n] for n in (*members, "baseline")) * (1 + 1e-9)
        assert {k for k in fold if k.startswith("w_")} == {"w_lightgbm", "w_linear", "w_baseline"}
        assert sum(v for k, v in fold.items() if k.startswith("w_")) == pytest.approx(1.0)
    pick = R.run_cell("synthetic", "automl", tmp_path, extra, n_folds=2, members=members)
    assert all(f["pick"] in ("linear", "lightgbm", "ensemble") for f in pick["folds"])
    page = R.page(tmp_path, ["synthetic"], ["linear", "lightgbm", "ensemble", "automl"])
    assert page.count("\n| ") == 8 and "| LightGBM |" in page and "not gated" in page
    assert "AutoML's pick per fold: **" in page


def test_head_to_head_tests_one_cell_against_another_on_the_same_rows():
    a = four_dates().assign(expiry=pd.Timestamp("2024-03-15"), strike=100.0, option_type="C")
    b = a.assign(model=a["baseline"])  # on quoted rows the baseline is persistence
    h = R.head_to_head(a, b)
    s = R.scores(a, "model")
    assert h["dm_p"] == pytest.approx(s["dm_p"]) and h["won"] == 0.75
    assert h["dm_p_all"] == pytest.approx(s["baseline_dm_p"]) and h["won_all"] == 1.0
    with pytest.raises(ValueError, match="hold other rows"):
        R.head_to_head(a, b.iloc[::-1].reset_index(drop=True))


def fake_fold(root: Path, name: str, fold: int, frames: dict[str, pd.DataFrame], n_params: int) -> None:
    """A finished fold of cell ``name`` as a walk-forward leaves it: predictions, metrics, data report."""
    d = root / name / f"fold_{fold}"
    (d / "predictions").mkdir(parents=True)
    for s, f in frames.items():
        f.to_parquet(d / "predictions" / f"{s}.parquet", index=False)
    val = frames["val"]
    rmse = float(np.sqrt(np.mean((val["model"] - val["market"]) ** 2)) * 100)
    (d / "metrics.json").write_text(json.dumps({"val/rmse": rmse, "n_params": n_params}))
    (d / "data_report.json").write_text("{}")


def market(n_dates: int, seed: int, start: str) -> pd.DataFrame:
    """``n_dates`` dates x 20 previously quoted contracts: the market is persistence plus a change."""
    rng = np.random.default_rng(seed)
    dates = np.repeat(pd.bdate_range(start, periods=n_dates), 20)
    prev = 0.2 + 0.02 * rng.standard_normal(len(dates))
    change = 0.01 * rng.standard_normal(len(dates))
    return pd.DataFrame({"target_date": dates, "expiry": pd.Timestamp("2030-01-01"),
                         "strike": np.tile(np.arange(20.0), n_dates), "option_type": "C", "prev_quoted": True,
                         "persistence": prev, "baseline": prev, "market": prev + change, "ssvi": prev,
                         "change": change})


@pytest.mark.parametrize("skill", [0.8, 0.0])
def test_automl_fold_keeps_linear_unless_a_network_beats_it_clearly_on_validation(tmp_path, skill):
    """The linear cell predicts a third of the change; a network predicting ``skill`` of it (plus noise) replaces it
    only when it is clearly better on the validation dates, and the pick's test predictions are that cell's."""
    rng = np.random.default_rng(0)
    frames = {"val": market(60, 1, "2024-01-01"), "test": market(30, 2, "2024-04-01")}

    def predicting(share: float, noise: float) -> dict[str, pd.DataFrame]:
        return {s: f.assign(model=f["persistence"] + share * f["change"] + noise * rng.standard_normal(len(f)))
                for s, f in frames.items()}

    fake_fold(tmp_path, "linear", 0, predicting(1 / 3, 0.0), 10)
    fake_fold(tmp_path, "mlp", 0, predicting(skill, 0.002), 1000)
    members = {n: tmp_path / n for n in ("linear", "mlp")}
    cfg = OmegaConf.create({"output_dir": str(tmp_path / "automl" / "fold_0"), "data": {"fold": 0, "horizon": 0},
                            "do_no_harm": {"cap": 0.9, "tolerance": 0.005, "max_p": 0.05}})
    R.automl_fold(members)(cfg)
    chosen = json.loads((tmp_path / "automl" / "fold_0" / "pick.json").read_text())
    assert chosen["pick"] == ("mlp" if skill else "linear")
    assert set(chosen["why"]) == {"linear", "mlp", "ensemble"} and set(chosen["ensemble"]) == {"mlp", "linear",
                                                                                              "baseline"}
    test = pd.read_parquet(tmp_path / "automl" / "fold_0" / "predictions" / "test.parquet")
    picked = pd.read_parquet(tmp_path / chosen["pick"] / "fold_0" / "predictions" / "test.parquet")
    np.testing.assert_array_equal(test["model"], picked["model"])
    # the ensemble's weights, fit on capped validation dates, sum to one over the three members
    assert sum(chosen["ensemble"].values()) == pytest.approx(1.0)


def test_kept_column_names_each_folds_shares_and_the_lightgbm_blend():
    folds = [{"w_model": 0.5, "w_linear": 0.5, "w_model_new": 1.0, "w_linear_new": 0.0, "w_lightgbm": 0.3},
             {"w_model": 0.0, "w_linear": 0.0, "w_model_new": 0.0, "w_linear_new": 1.0, "w_lightgbm": 0.0}]
    assert R.kept({"name": "mlp", "folds": folds}) == "(0.5m+0.5r)+0.30t, p / (m)+0.30t, r"
