"""Issue 10: the ridge in closed form, the do-no-harm blend and its robust rule, quote filters, winsorizing, the
messy synthetic market."""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.test_data import load, make_chain, write
from vforge.data import features as feats
from vforge.data import messy, synthetic
from vforge.data.dataset import format_report, inner_folds
from vforge.evaluation.metrics import per_date_ratio, robust_score
from vforge.models.linear import Blend, Ridge
from vforge.training.gating import (
    capped_ratio,
    choose_blend,
    clip_like,
    do_no_harm,
    shrink_ridge,
    sign_test,
    wins_over,
)


def test_ridge_closed_form_recovers_an_interaction_and_refuses_noise():
    g = np.random.default_rng(0)
    n, dates = 4000, np.repeat(np.arange(40), 100)
    x = g.standard_normal((n, 3))
    y = 0.5 * x[:, 0] - 0.3 * x[:, 1] * x[:, 2] + 0.01 * g.standard_normal(n)
    ridge = Ridge(n_num=3, cat_cardinalities=[], d_out=1, tolerance=0.0)
    info = ridge.fit_closed_form(torch.tensor(x), None, torch.tensor(y), dates)
    pred = ridge(torch.tensor(x, dtype=torch.float32), None)[:, 0].detach().numpy()
    assert np.sqrt(np.mean((pred - y) ** 2)) < 0.02 and info["alpha"] < math.inf
    # Pure noise: no penalty beats predicting no change on the folds, so it is persistence (all weights 0).
    noise = Ridge(n_num=3, cat_cardinalities=[], d_out=1, tolerance=0.05)
    info = noise.fit_closed_form(torch.tensor(x), None, torch.tensor(g.standard_normal(n)), dates)
    assert info["alpha"] == math.inf and "persistence" in info["why"]
    assert torch.count_nonzero(noise.weight) == 0


def test_ridge_inputs_are_clipped_to_their_fit_rows_quantiles_and_the_bounds_are_saved():
    """A row far outside the training range (here x0 = 50 where it was within +-1) would get ~50 x the interaction
    unclipped; clipped, it is predicted as at the fit rows' 0.999 quantile of x0, and the bounds travel with the
    state dict (serving, export)."""
    g = np.random.default_rng(2)
    x = torch.tensor(g.uniform(-1, 1, (5000, 2)))
    y = x[:, 0] * x[:, 1]
    dates = np.repeat(np.arange(50), 100)
    far, at_bound = torch.tensor([[50.0, 0.5]]), torch.tensor([[np.quantile(x[:, 0].numpy(), 0.999), 0.5]])
    plain, clipped = (Ridge(n_num=2, cat_cardinalities=[], d_out=1, clip=c) for c in (None, 0.001))
    for ridge in (plain, clipped):
        ridge.fit_closed_form(x, None, y, dates, alpha=1e-6)
    assert plain(far.float(), None).item() == pytest.approx(25.0, rel=0.01)
    assert clipped(far.float(), None).item() == pytest.approx(clipped(at_bound.float(), None).item(), abs=1e-6)
    assert clipped(at_bound.float(), None).item() == pytest.approx(at_bound[0, 0].item() * 0.5, abs=0.01)
    np.testing.assert_allclose(clipped.lo.numpy(), np.quantile(x.numpy(), 0.001, axis=0))
    copy = Ridge(n_num=2, cat_cardinalities=[], d_out=1)
    copy.load_state_dict(clipped.state_dict())
    assert copy(far.float(), None).item() == clipped(far.float(), None).item()
    with pytest.raises(ValueError, match="clip must be a quantile"):
        Ridge(n_num=2, cat_cardinalities=[], d_out=1, clip=0.5)


def test_a_split_ridge_is_two_ridges_one_per_kind_of_rows_with_the_same_penalty():
    """``split_by``: rows where that input is positive (contracts new on the date) get their own ridge, which
    must solve as a ridge fit on those rows alone (its columns scaled on them) and leave the other rows' fit as a
    ridge fit on theirs: a few large new-contract targets no longer bend the previously quoted rows' fit."""
    g = np.random.default_rng(7)
    n, dates = 3000, np.repeat(np.arange(30), 100)
    x = g.standard_normal((n, 3))
    new = g.random(n) < 0.1
    x[:, 2] = np.where(new, 2.5, 0.0)  # the scaled prev_iv_missing: 0 for quoted rows, positive for new ones
    y = np.where(new, 3.0 - 2.0 * x[:, 0] * x[:, 1], 0.4 * x[:, 0]) + 0.05 * g.standard_normal(n)
    x, y = torch.tensor(x), torch.tensor(y)
    split = Ridge(n_num=3, cat_cardinalities=[], d_out=1, clip=None, split_by="missing")
    split.prepare(SimpleNamespace(feature_names=["a", "b", "missing"]))
    split.fit_closed_form(x, None, y, dates, alpha=0.01)
    for rows in (~new, new):
        alone = Ridge(n_num=3, cat_cardinalities=[], d_out=1, clip=None)
        alone.fit_closed_form(x[rows], None, y[rows], dates[rows], alpha=0.01)
        np.testing.assert_allclose(split(x[rows].float(), None).detach().numpy(),
                                   alone(x[rows].float(), None).detach().numpy(), atol=1e-5)
    one = Ridge(n_num=3, cat_cardinalities=[], d_out=1, clip=None)
    one.fit_closed_form(x, None, y, dates, alpha=0.01)
    err = lambda m: float(((m(x[~new].float(), None)[:, 0] - y[~new]) ** 2).mean())  # noqa: E731
    assert err(split) < 0.01 < err(one)  # one ridge for both kinds fits the quoted rows worse
    copy = Ridge(n_num=3, cat_cardinalities=[], d_out=1, clip=None, split_by="missing")
    copy.load_state_dict(split.state_dict())  # the index travels with the weights
    assert int(copy.split_index) == 2 and torch.equal(copy(x.float(), None), split(x.float(), None))
    with pytest.raises(ValueError, match="fit before prepare"):
        Ridge(n_num=3, cat_cardinalities=[], d_out=1, split_by="missing").fit_closed_form(x, None, y, dates, alpha=0.1)
    # a run without that input: every row in the first half, which is the one ridge exactly
    absent = Ridge(n_num=3, cat_cardinalities=[], d_out=1, clip=None, split_by="missing")
    absent.prepare(SimpleNamespace(feature_names=["a", "b", "c"]))
    absent.fit_closed_form(x, None, y, dates, alpha=0.01)
    np.testing.assert_allclose(absent(x.float(), None).detach().numpy(), one(x.float(), None).detach().numpy(),
                               atol=1e-5)


def test_each_half_of_a_split_ridge_has_its_own_penalty_given_or_chosen_on_its_own_rows():
    """A pair of penalties solves each half as a ridge with its own; chosen on the folds, each half's penalty is
    scored on its rows alone: a clean signal on the quoted rows keeps a small penalty while noise on the new
    contracts (a tenth of the rows) is persistence there (inf: weights 0), and a single penalty for both is refused
    without ``split_by``."""
    g = np.random.default_rng(11)
    n, dates = 4000, np.repeat(np.arange(40), 100)
    x = g.standard_normal((n, 3))
    new = g.random(n) < 0.1
    x[:, 2] = np.where(new, 2.5, 0.0)
    y = torch.tensor(np.where(new, 3.0 * g.standard_normal(n), 0.4 * x[:, 0] + 0.05 * g.standard_normal(n)))
    x = torch.tensor(x)
    names = SimpleNamespace(feature_names=["a", "b", "missing"])
    split = Ridge(n_num=3, cat_cardinalities=[], d_out=1, clip=None, split_by="missing")
    split.prepare(names)
    split.fit_closed_form(x, None, y, dates, alpha=(1e-4, 10.0))
    for rows, a in ((~new, 1e-4), (new, 10.0)):
        alone = Ridge(n_num=3, cat_cardinalities=[], d_out=1, clip=None)
        alone.fit_closed_form(x[rows], None, y[rows], dates[rows], alpha=a)
        np.testing.assert_allclose(split(x[rows].float(), None).detach().numpy(),
                                   alone(x[rows].float(), None).detach().numpy(), atol=1e-5)
    chosen = Ridge(n_num=3, cat_cardinalities=[], d_out=1, clip=None, split_by="missing", tolerance=0.05)
    chosen.prepare(names)
    info = chosen.fit_closed_form(x, None, y, dates)
    assert info["alpha"] < 1.0 and info["alpha_new"] == math.inf and "second half" in info["why"]
    half = chosen.weight.shape[1] // 2
    assert torch.count_nonzero(chosen.weight[:, half:]) == 0 < torch.count_nonzero(chosen.weight[:, :half])
    quoted = chosen(x[~new].float(), None)[:, 0].detach().numpy()
    assert np.sqrt(np.mean((quoted - y[~new].numpy()) ** 2)) < 0.1  # predicting no change: 0.4
    with pytest.raises(ValueError, match="a penalty per half needs split_by"):
        Ridge(n_num=3, cat_cardinalities=[], d_out=1).fit_closed_form(x, None, y, dates, alpha=(0.1, 1.0))


def test_per_date_ratio_and_trimmed_score_by_hand():
    pred, true = np.array([1.0, 1.0, 0.0, 2.0]), np.array([2.0, 0.0, 1.0, 2.0])
    dates = np.array([5, 5, 7, 7])
    # date 5: model (1 + 1) / persistence (4 + 0) = 0.5; date 7: (1 + 0) / (1 + 4) = 0.2
    np.testing.assert_allclose(per_date_ratio(pred, true, dates), [0.5, 0.2])
    assert robust_score(np.array([0.1, 0.5, 0.6, 0.7, 50.0]), trim=0.2) == pytest.approx(0.6)
    assert robust_score(np.array([0.1, 0.5, 9.0]), trim=0.5) == 0.5


def test_one_jump_does_not_decide_and_a_useless_model_falls_back_to_persistence():
    g = np.random.default_rng(1)
    dates = np.repeat(np.arange(20), 50)
    true = g.standard_normal(1000)
    good = true * 0.8  # explains most of every date's change...
    good[dates == 3] -= 40.0  # ...but misses one jump date badly: on plain MSE it would lose to persistence
    assert np.mean((good - true) ** 2) > np.mean(true**2)
    choice = choose_blend(good, None, true, dates, weights=[0, 0.5, 1], trim=0.2, tolerance=0.0)
    assert choice["w_model"] == 1.0
    bad = -true
    choice = choose_blend(bad, None, true, dates, weights=[0, 0.5, 1], trim=0.2, tolerance=0.0)
    assert (choice["w_model"], choice["w_linear"]) == (0.0, 0.0) and "persistence" in choice["why"]
    # Equal evidence: the simpler candidate (the linear model alone) beats a blend that scores the same.
    choice = choose_blend(true * 0.5, true * 0.5, true, dates, weights=[0, 0.5, 1], trim=0.2, tolerance=0.3)
    assert choice["w_model"] == 0.0 and choice["w_linear"] > 0


def test_sign_test_and_dates_won_by_hand():
    # 9 of 11 dates won: P(X >= 9) for X ~ Binomial(11, 1/2) = (55 + 11 + 1) / 2048
    assert sign_test(np.array([True] * 9 + [False] * 2)) == pytest.approx(67 / 2048)
    dates = np.array([0, 0, 1, 1, 2])
    true = np.array([1.0, 1.0, 0.0, 0.0, 2.0])
    cand, ref = np.array([1.0, 1.0, 1.0, 0.0, 2.0]), np.zeros(5)  # date 0 won, date 1 lost, date 2 won
    won, n, p = wins_over(cand, ref, true, dates)
    assert (won, n) == (2, 3) and p == pytest.approx(0.5)
    assert wins_over(ref, ref, true, dates)[:2] == (0, 0)  # ties are not evidence either way


def test_ridge_share_needs_a_clear_majority_of_fold_dates():
    g = np.random.default_rng(3)
    dates = np.repeat(np.arange(40), 30)
    true = g.standard_normal(1200)
    good = 0.6 * true + 0.3 * g.standard_normal(1200)
    chosen = shrink_ridge(good, true, dates, weights=[0, 0.5, 1], trim=0.2, tolerance=0.0, max_p=0.05)
    assert chosen["w_linear"] > 0 and chosen["won"] >= 30
    # Two perfect dates and a slight loss on the other 38: the mean ratio (0.969) says better, the dates do not.
    lucky = np.where(np.isin(dates, [3, 7]), true, -0.01 * true)
    assert robust_score(per_date_ratio(lucky, true, dates), 0.0) < 0.98
    chosen = shrink_ridge(lucky, true, dates, weights=[0, 0.5, 1], trim=0.0, tolerance=0.0, max_p=0.05)
    assert chosen["w_linear"] == 0.0 and "2/40" in chosen["why"]


def test_capped_ratio_by_hand_and_a_blend_weighs_new_contracts_apart():
    dates = np.array([0, 1, 2])
    true = np.array([1.0, 1.0, 10.0])  # persistence's losses 1, 1, 100: the jump date is capped to the median, 1
    pred = np.array([1 - 0.5**0.5, 1 - 0.5**0.5, 10 - 10**0.5])  # model losses 0.5, 0.5, 10
    assert capped_ratio(pred, true, dates, cap=0.5) == pytest.approx((0.5 + 0.5 + 10 / 100) / 3)
    assert capped_ratio(pred, true, dates, cap=1.0) == pytest.approx(11 / 102)  # no cap: pooled
    cfg = {"_target_": "vforge.models.linear.Ridge", "interactions": False}
    blend = Blend(n_num=2, cat_cardinalities=[], d_out=1, model=cfg, linear=cfg, w_model=0.0, w_linear=0.5,
                  w_model_new=1.0, w_linear_new=0.0, new_column=1)
    x = torch.tensor([[1.0, -0.3], [1.0, 2.0]])  # row 0 previously quoted (column 1 <= 0), row 1 new
    out = blend(x, None)[:, 0]
    torch.testing.assert_close(out, torch.stack([0.5 * blend.linear(x, None)[0, 0], blend.model(x, None)[1, 0]]))


def test_inner_folds_cover_the_last_dates_in_order():
    blocks = inner_folds(np.repeat(np.arange(10, 30), 3), n_folds=4, fraction=0.5)
    assert [list(b) for b in blocks] == [[20, 21, 22], [23, 24, 25], [26, 27], [28, 29]]
    assert inner_folds(np.arange(3), n_folds=4, fraction=0.5) == []


def test_do_no_harm_leaves_the_model_alone_where_it_does_not_apply():
    from types import SimpleNamespace

    model, config = torch.nn.Linear(2, 1), {"model": {"_target_": "x"}, "run_name": "m"}
    on = OmegaConf.create({"enabled": True, "weights": [0, 1], "trim": 0.2, "tolerance": 0.0})
    change, level = SimpleNamespace(target="change", val=[1]), SimpleNamespace(target="level", val=[1])
    for settings, data, d_out in [(None, change, 1), (OmegaConf.merge(on, {"enabled": False}), change, 1),
                                  (on, level, 1), (on, change, 3), (on, SimpleNamespace(target="change", val=[]), 1)]:
        kept = do_no_harm(settings, model, data, config, d_out=d_out)  # type: ignore[arg-type]
        assert kept.module is model and kept.config is config and kept.note == "" and kept.metrics == {}


def test_blend_rebuilds_from_its_config_and_mixes_outputs():
    cfg = {"_target_": "vforge.models.linear.Ridge", "interactions": False}
    blend = Blend(n_num=2, cat_cardinalities=[], d_out=1, model=cfg, linear=cfg, w_model=0.25, w_linear=0.5)
    x = torch.randn(8, 2)
    expect = 0.25 * blend.model(x, None) + 0.5 * blend.linear(x, None)
    torch.testing.assert_close(blend(x, None), expect)


def test_quote_filters_are_named_and_counted_and_assumed_rates_reported(make_cfg, tmp_path):
    df = make_chain().drop(columns=[]).assign(implied_volatility=lambda d: d["true_iv"])
    df = df.drop(columns="true_iv")
    df.loc[df.index[:7], "implied_volatility"] = 2.5       # implausible IVs
    off = df.index[(df["strike"] == 100.0) & (df["option_type"] == "C")][:3]
    df.loc[off, "implied_volatility"] += 0.08               # outside its own bid/ask band
    short = pd.concat([df.iloc[:4].assign(expiry=lambda d: d["quote_date"] + pd.Timedelta(days=2))])
    df = pd.concat([df, short], ignore_index=True)
    ds = load(make_cfg, write(df, tmp_path / "c.csv"), "data.max_spread_vol=null", "data.itm_from_otm=false")
    dropped = ds.report["dropped"]
    assert dropped["drop_short_expiry"] == 4
    assert dropped["drop_iv_range"] == 7
    assert dropped["drop_iv_outside_quote"] == 3
    text = format_report(ds.report)
    assert "fewer than data.min_days" in text and "given IV outside its own bid/ask" in text
    assert "0.02 used (data.rate): the table has no rate column" in text


def test_winsorizing_clips_train_targets_only_each_kind_to_its_own_quantiles_and_scales_not_centres(make_cfg):
    ds = instantiate(make_cfg("data.winsorize=0.05").data, _convert_="all")
    raw = lambda s: s.iv - s.base  # noqa: E731
    y_train, y_raw = ds.train.y.numpy() * ds.y_scale, raw(ds.train)
    new = ~np.isfinite(ds.train.persistence)
    assert 0 < new.sum() < len(new) and "train only" in ds.report["winsorized"]
    for kind in (new, ~new):
        lo, hi = np.quantile(y_raw[kind], [0.05, 0.95])
        assert lo - 1e-6 <= y_train[kind].min() and y_train[kind].max() <= hi + 1e-6
        inside = (y_raw[kind] > lo) & (y_raw[kind] < hi)  # untouched inside the kind's own range
        np.testing.assert_allclose(y_train[kind][inside], y_raw[kind][inside], atol=1e-6)
        assert np.isclose(y_train[kind], hi, atol=1e-6).any() and np.isclose(y_train[kind], lo, atol=1e-6).any()
    # a new contract moves more (over the previous surface): pooled quantiles would clip its ordinary moves
    assert np.quantile(y_raw[new], 0.95) > 2 * np.quantile(y_raw[~new], 0.95)
    np.testing.assert_allclose(ds.val.y.numpy() * ds.y_scale, raw(ds.val), atol=1e-6)  # untouched
    for i, name in enumerate(ds.feature_names):
        if name in feats.UNCENTERED:
            assert ds.x_mean[i] == 0.0
            assert np.sqrt(np.mean(ds.train.x_num[:, i].numpy() ** 2)) == pytest.approx(1.0, rel=1e-3)


def test_one_iv_nodes_keep_the_otm_quote_and_smile_features_of_a_parabola():
    nodes = pd.DataFrame({"date_idx": 0, "expiry": pd.Timestamp("2024-06-21"), "tau": 0.25,
                          "strike": [90.0, 90.0, 110.0, 110.0], "option_type": ["C", "P", "C", "P"],
                          "log_moneyness": np.log([0.9, 0.9, 1.1, 1.1]), "iv": [0.30, 0.25, 0.18, 0.22]})
    one = feats.one_iv_nodes(nodes)
    assert sorted(zip(one["strike"], one["option_type"])) == [(90.0, "P"), (110.0, "C")]
    k = np.linspace(-0.3, 0.3, 13)
    smile = pd.DataFrame({"date_idx": 0, "expiry": pd.Timestamp("2024-06-21"), "tau": 0.25, "strike": 100 * np.exp(k),
                          "option_type": "C", "log_moneyness": k, "iv": 0.2 - 0.1 * k + 0.5 * k**2})
    rows = pd.DataFrame({"info_idx": [0], "log_moneyness": [0.05], "tau": [0.25]})
    out = feats.smile_features(rows, smile).iloc[0]
    assert out["prev_smile_iv"] == pytest.approx(0.2 - 0.005 + 0.00125, abs=2e-3)
    assert out["prev_smile_slope"] == pytest.approx((-0.1 + 1.0 * 0.05) * 0.5, abs=3e-3)
    assert out["prev_smile_curvature"] == pytest.approx(1.0 * 0.25, rel=0.2)


def test_messy_market_has_gaps_jumps_junk_and_a_calls_only_variant(make_cfg):
    tiny = ["data.n_days=60", "data.listing.n_monthlies=3", "data.listing.n_weeklies=1"]
    cfg = make_cfg("data=synthetic_messy", *tiny, tiny=False)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    raw = messy.generate_messy_chain(**{k: data[k] for k in inspect.signature(messy.generate_messy_chain).parameters})
    gaps = np.diff(np.unique(raw["quote_date"])).astype("timedelta64[D]").astype(int)
    assert gaps.max() >= 7 + 3  # a missing week (plus its weekends)
    assert (raw["bid"] == 0).mean() > 0.02 and "rate" not in raw.columns
    assert raw.groupby("regime")["quote_date"].nunique().size == 3
    ds = instantiate(make_cfg("data=synthetic_messy", *tiny, "data.calls_only=true", tiny=False).data, _convert_="all")
    assert set(ds.train.rows["option_type"]) == {"C"} and "calls only" in ds.report["source"]


def test_cache_key_follows_the_generator_source(tmp_path):
    a = synthetic.generator_digest()
    b = synthetic.generator_digest(messy)
    assert a != b and len(a) == 16


def test_ridge_fold_path_is_the_refit_on_each_fold_at_each_given_penalty():
    g = np.random.default_rng(4)
    x, dates = torch.tensor(g.standard_normal((600, 3))), np.repeat(np.arange(30), 20)
    x[dates >= 20] *= 3.0  # later dates spread wider: a fold's column scale is that of its own fit rows
    y = 0.4 * x[:, 0] + 0.2 * x[:, 1] * x[:, 2] + 0.3 * torch.tensor(g.standard_normal(600))
    blocks = [np.arange(10, 15), np.arange(15, 22), np.arange(26, 30)]  # 22-25 in no block
    mask, path = Ridge(n_num=3, cat_cardinalities=[], d_out=1).fold_path(x, None, y, dates, blocks,
                                                                         [1e-3, 1.0, math.inf])
    np.testing.assert_array_equal(mask, np.isin(dates, np.concatenate(blocks)))
    for block in blocks:
        fit, rows = torch.as_tensor(dates < block[0]), np.isin(dates, block)
        for j, alpha in enumerate([1e-3, 1.0]):
            ridge = Ridge(n_num=3, cat_cardinalities=[], d_out=1)
            assert ridge.fit_closed_form(x[fit], None, y[fit], dates[fit.numpy()], alpha=alpha)["alpha"] == alpha
            np.testing.assert_allclose(path[rows, j], ridge(x[rows].float(), None)[:, 0].detach().numpy(), atol=1e-5)
    assert not path[:, 2].any() and not path[~mask].any()  # an infinite penalty, or no fold: no change
    # a larger penalty shrinks the predicted change
    assert np.abs(path[mask, 1]).mean() < np.abs(path[mask, 0]).mean()


def test_the_ridge_penalty_is_chosen_with_its_share_on_the_fold_dates():
    g = np.random.default_rng(5)
    dates = np.repeat(np.arange(40), 30)
    true = g.standard_normal(1200)
    signal = 0.6 * true + 0.3 * g.standard_normal(1200)
    overfit = signal + 1.5 * g.standard_normal(1200)  # the small penalty's predictions: worse than persistence
    shrunk = 0.8 * signal  # the large penalty's
    chosen = shrink_ridge(np.column_stack([overfit, shrunk]), true, dates, weights=[0, 0.5, 1], trim=0.2,
                          tolerance=0.0, max_p=0.05, cap=0.9, alphas=[1e-4, 1.0])
    assert chosen["alpha"] == 1.0 and chosen["w_linear"] > 0 and "(penalty 1)" in chosen["why"]
    assert chosen["scores"][(1e-4, 1.0)] > 1.0 > chosen["score"]
    # equal scores within the tolerance: the smaller share first, then the larger penalty
    same = shrink_ridge(np.column_stack([signal, signal]), true, dates, weights=[0, 0.5, 1], trim=0.2,
                        tolerance=0.3, max_p=1.0, cap=0.9, alphas=[1e-4, 1.0])  # 1 x: 0.25, 0.5 x: ~0.51
    assert (same["w_linear"], same["alpha"]) == (0.5, 1.0)
    # nothing beats persistence: persistence, and the best-scoring penalty is still named for other rows
    none = shrink_ridge(np.column_stack([overfit, -true]), true, dates, weights=[0, 0.5, 1], trim=0.2,
                        tolerance=0.0, max_p=0.05, cap=0.9, alphas=[1e-4, 1.0])
    assert none["w_linear"] == 0.0 and none["alpha"] in (1e-4, 1.0) and "persistence" in none["why"]
    with pytest.raises(ValueError, match="2 columns of fold predictions for 1 penalties"):
        shrink_ridge(np.column_stack([signal, signal]), true, dates, weights=[0, 1], trim=0.2, tolerance=0.0,
                     max_p=0.05, alphas=[1.0])


def test_validation_targets_are_clipped_to_the_train_range_of_their_kind():
    y_train, prev_train = np.array([-1.0, 2.0, -5.0, 9.0]), np.array([True, True, False, False])
    y, prev = np.array([3.0, -3.0, 10.0, -6.0, 1.0]), np.array([True, True, False, False, True])
    np.testing.assert_array_equal(clip_like(y_train, prev_train, y, prev), [2.0, -1.0, 9.0, -5.0, 1.0])
    # no new contract in train: the new rows take the whole range
    np.testing.assert_array_equal(clip_like(y_train[:2], prev_train[:2], y, prev), [2.0, -1.0, 2.0, -1.0, 1.0])


def test_score_se_by_hand_and_the_one_standard_error_rule_keeps_less_on_thin_evidence():
    from vforge.evaluation.metrics import score_se

    # three dates, persistence losses 1, 1, 4; a's losses 0, 1, 1 and b's 1, 1, 4 (b is persistence)
    dates, true = np.array([0, 1, 2, 2]), np.array([1.0, 1.0, 2.0 ** 0.5, 2.0 ** 0.5])
    a, b = np.array([1.0, 0.0, 2.0 ** 0.5 - 0.5**0.5, 2.0 ** 0.5 - 0.5**0.5]), np.zeros(4)
    part = np.array([-1.0, 0.0, -3.0]) / 6.0  # per-date loss differences over the pooled persistence loss
    assert score_se(a, b, true, dates, cap=1.0) == pytest.approx(np.sqrt(3) * part.std(ddof=1))
    capped = np.array([-1.0, 0.0, -3.0 / 4.0]) / 3.0  # date 2's weight 1/4 (the median of 1, 1, 4 is 1)
    assert score_se(a, b, true, dates, cap=0.5) == pytest.approx(np.sqrt(3) * capped.std(ddof=1))
    ratios = np.array([-1.0, 0.0, -0.75])  # without a cap: the per-date ratio differences' standard error
    assert score_se(a, b, true, dates, cap=None) == pytest.approx(ratios.std(ddof=1) / np.sqrt(3))
    assert score_se(a[:1], b[:1], true[:1], dates[:1], cap=0.9) == math.inf  # one date: no spread to measure

    # A real gain that varies from date to date (the predicted change is c x the true one, c ~ N(0.5, 0.6) per
    # date: expected loss ratios 0.61 at the full share, 0.65 at half): the full share scores best on 12 fold
    # dates too, but not by a standard error, so the rule keeps half; on 400 dates it is clear, the full share kept.
    g = np.random.default_rng(7)
    for n_dates, share in ((12, 0.5), (400, 1.0)):
        from scipy.stats import norm

        c = 0.5 + 0.6 * g.permutation(norm.ppf((np.arange(n_dates) + 0.5) / n_dates))  # N(0.5, 0.6)'s quantiles
        dates = np.repeat(np.arange(n_dates), 200)
        true = g.standard_normal(len(dates))
        pred = np.repeat(c, 200) * true
        plain = shrink_ridge(pred, true, dates, weights=[0, 0.5, 1], trim=0.2, tolerance=0.0, max_p=1.0, cap=0.9)
        rule = shrink_ridge(pred, true, dates, weights=[0, 0.5, 1], trim=0.2, tolerance=0.0, max_p=1.0, cap=0.9,
                            se=1.0)
        assert plain["w_linear"] == 1.0 and rule["w_linear"] == share, (n_dates, plain, rule)


def _zero_change_model(data):
    """An MLP whose output is the scaled target of no change (persistence, else the baseline) everywhere."""
    cfg = {"_target_": "vforge.models.mlp.MLP", "n_blocks": 1, "d_block": 4, "dropout": 0.0}
    model = instantiate(cfg, n_num=data.n_num, cat_cardinalities=[], d_out=1)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(-data.y_center / data.y_scale)
    return model, cfg


@pytest.mark.parametrize("signal", [True, False])
def test_lightgbm_is_blended_in_only_when_it_earns_its_place(make_cfg, signal):
    """The true change a step in the first feature (2 vol points either way; LightGBM finds it, the zero-change
    model cannot): the blend is kept, almost all LightGBM, and the saved ensemble predicts what was scored. Pure
    noise instead: LightGBM cannot help and the zero-change model stays."""
    from vforge.training.boosting import blend_lightgbm
    from vforge.training.gating import DoNoHarm

    cfg = make_cfg()
    data = instantiate(cfg.data, _convert_="all")
    rng = np.random.default_rng(0)
    for split in (data.train, data.val, data.test):
        x0 = split.x_num[:, 0].numpy()
        change = 0.02 * np.sign(x0 - np.median(data.train.x_num[:, 0].numpy())) if signal else \
            0.005 * rng.standard_normal(len(x0))
        split.iv = split.base + change
        split.y = torch.as_tensor((change - data.y_center) / data.y_scale, dtype=torch.float32)
    model, model_cfg = _zero_change_model(data)
    kept = DoNoHarm(model, {"model": model_cfg, "run_name": "zero"})
    settings = OmegaConf.create({"enabled": True, "lightgbm": True, "tolerance": 0.005, "max_p": 0.05, "cap": 0.9})
    out = blend_lightgbm(settings, kept, data, d_out=1, n_threads=1)
    if not signal:
        assert out.module is model and "not kept" in out.note and out.metrics["do_no_harm/w_lightgbm"] == 0.0
        return
    assert out.metrics["do_no_harm/w_lightgbm"] > 0.9 and "LightGBM blend kept" in out.note
    assert out.config["model"]["_target_"] == "vforge.models.ensemble.Ensemble"
    rebuilt = instantiate(out.config["model"], n_num=data.n_num, cat_cardinalities=[], d_out=1)
    rebuilt.load_state_dict(out.module.state_dict())
    with torch.inference_mode():
        got = data.to_level(rebuilt.eval()(data.test.x_num, None)[:, 0].numpy(), data.test)
    # the step is learnt: far below persistence's 2 vol points on the test rows
    assert np.sqrt(np.mean((got - data.test.iv) ** 2)) < 0.005
    assert blend_lightgbm(OmegaConf.merge(settings, {"lightgbm": False}), kept, data, d_out=1) is kept


def test_the_gate_chooses_the_new_contracts_ridge_penalty_on_their_own_fold_rows(make_cfg):
    """Quoted rows: a weak signal under heavy noise (a large penalty is best there); new contracts: a clean, strong
    one (a small penalty). The gate chooses each kind's penalty on that kind's inner-fold rows and serves a ridge
    fit with both: the new contracts' penalty is the smaller, and the served ridge predicts those rows as a ridge
    fit on them alone with it."""
    from vforge.training.gating import RIDGE, gate

    data = instantiate(make_cfg().data, _convert_="all")
    rng = np.random.default_rng(3)
    names = list(data.feature_names)
    col, new_col = names.index("log_moneyness"), names.index("prev_iv_missing")
    for split in (data.train, data.val, data.test):
        x, new = split.x_num[:, col].numpy(), ~np.isfinite(split.persistence)
        change = np.where(new, 0.02 * x, 0.001 * x + 0.01 * rng.standard_normal(len(x)))
        split.iv = split.base + change
        split.y = torch.as_tensor((change - data.y_center) / data.y_scale, dtype=torch.float32)
    assert (data.train.x_num[:, new_col] > 0).numpy().tolist() == (~np.isfinite(data.train.persistence)).tolist()
    model, model_cfg = _zero_change_model(data)
    module, _, choice = gate(model, data, model_cfg=model_cfg, model_name="zero", weights=[0, 0.5, 1], trim=0.2,
                             tolerance=0.005, cap=0.9)
    assert choice["alpha_new"] < choice["alpha"] and choice["w_linear_new"] == 1.0, choice["note"]
    # against the ridge served before, one penalty (the quoted rows') for both halves, on the validation contracts
    # new on the date: the penalty chosen for them fits them better
    tr, va = data.train, data.val
    one = instantiate(RIDGE, n_num=data.n_num, cat_cardinalities=data.cat_cardinalities, d_out=1)
    one.prepare(data)
    one.fit_closed_form(tr.x_num, tr.x_cat, tr.y, tr.aux["quote_date_idx"].numpy(), alpha=choice["alpha"])
    on = ~np.isfinite(va.persistence)
    err = lambda m: float(((m(va.x_num[on], None if va.x_cat is None else va.x_cat[on])[:, 0] - va.y[on]) ** 2  # noqa: E731
                           ).mean())
    with torch.no_grad():
        assert err(module.linear) < 0.8 * err(one)
