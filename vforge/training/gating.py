"""Do no harm: how much of a model's predicted change to keep, chosen out of sample by rules one jump cannot decide.

The prediction of a change model is persistence plus a change; ``gate`` decides how much of the network's and of
the ridge's predicted change to keep, apart for previously quoted rows and for contracts new on the date. The
ridge's share comes from inner walk-forward folds over the training and validation dates (many out-of-sample
dates; ``shrink_ridge``), the network's from its validation dates, where it must beat that choice clearly
(``decide``). Scores are ``capped_ratio`` (the pooled MSE ratio to persistence, each date's weight capped at a
quantile; or the trimmed mean of per-date ratios, ``robust_score``), evidence ``wins_over`` (a one-sided DM test on
the capped per-date losses, or a sign test). Among blends scoring within ``tolerance`` of the best the simplest wins
(persistence, then the ridge alone, then anything with the network; less weight before more); the ridge's (penalty,
share) pairs also within ``se`` standard errors of their difference from the best across the fold dates
(``score_se``: thin or disagreeing dates widen it; the network's blend has to pass a significance test instead). What cannot beat
persistence leaves persistence, and the note under the results table says so.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vforge.data.dataset import inner_folds, kind_bounds
from vforge.evaluation.metrics import (
    capped_ratio,
    capped_weights,
    date_losses,
    per_date_ratio,
    robust_score,
    score_se,
)

if TYPE_CHECKING:
    from torch import nn

    from vforge.data.dataset import Dataset


def choose_blend(model_change: np.ndarray, linear_change: np.ndarray | None, true_change: np.ndarray,
                 dates: np.ndarray, *, weights: list[float], trim: float, tolerance: float,
                 cap: float | None = None) -> dict:
    """The blend to keep, and why. Returns ``w_model, w_linear, score`` (of the chosen blend), ``scores`` (of the
    model alone, the linear model alone, persistence) and ``why``."""
    grid = sorted(set(float(w) for w in weights) | {0.0, 1.0})
    pairs = [(m, w) for m, w in itertools.product(grid, grid if linear_change is not None else [0.0]) if m + w <= 1 + 1e-9]
    lin = np.zeros_like(model_change) if linear_change is None else linear_change
    score = {p: _score(p[0] * model_change + p[1] * lin, true_change, dates, trim, cap) for p in pairs}
    best = min(score.values())
    simplicity = lambda p: (p[0] > 0, p[1] > 0, p[0] + p[1], p[0])  # noqa: E731
    chosen = min((p for p in pairs if score[p] <= best + tolerance), key=simplicity)
    if score[chosen] >= 1.0:
        chosen = (0.0, 0.0)
    named = {"model": score[(1.0, 0.0)], "persistence": score[(0.0, 0.0)]}
    if linear_change is not None:
        named["linear"] = score[(0.0, 1.0)]
    if chosen == (0.0, 0.0):
        why = "nothing beat persistence on the validation dates: falls back to persistence"
    elif score[chosen] > best:
        why = f"the simplest blend within {tolerance:g} of the best ({best:.3f})"
    else:
        why = "the best blend"
    return {"w_model": chosen[0], "w_linear": chosen[1], "score": score[chosen], "scores": named, "why": why}


def describe(choice: dict, model_name: str) -> str:
    """One paragraph for the results table: what was chosen for each kind of rows, and why."""
    lines = []
    for kind, c in choice["kinds"].items():
        parts = [f"{w:g} x {name}" for w, name in ((c["w_model"], model_name), (c["w_linear"], "ridge")) if w]
        lines.append(f"  {KINDS[kind]}: " + (" + ".join(parts) + " (rest: persistence)" if parts else "persistence")
                     + f"; {c['why']}")
    return "do no harm (predicted change kept, chosen out of sample):\n" + "\n".join(lines)


def _score(pred: np.ndarray, true: np.ndarray, dates: np.ndarray, trim: float, cap: float | None) -> float:
    """``capped_ratio`` when ``cap`` is given, else the trimmed mean of per-date ratios (``robust_score``)."""
    return capped_ratio(pred, true, dates, cap) if cap is not None else robust_score(
        per_date_ratio(pred, true, dates), trim)


def _test(cap: float | None) -> str:
    return "sign test" if cap is None else "DM test"


def sign_test(better: np.ndarray) -> float:
    """One-sided sign test: the probability of at least this many dates won (``better`` True) out of the dates that
    are not ties, if each date were a coin flip."""
    from scipy.stats import binomtest

    wins, n = int(np.sum(better)), len(better)
    return float(binomtest(wins, n, 0.5, alternative="greater").pvalue) if n else 1.0


def wins_over(candidate: np.ndarray, reference: np.ndarray, true: np.ndarray, dates: np.ndarray,
              cap: float | None = None) -> tuple[int, int, float]:
    """Evidence that ``candidate`` (predicted change) has a lower loss than ``reference`` across dates: (dates won,
    dates that are not ties, one-sided p-value). With ``cap``: the Diebold-Mariano test (Newey-West, HLN;
    ``vforge.evaluation.significance``) on per-date losses whose weights are capped as in ``capped_ratio`` (big-move
    dates, where a change is predictable, count fully; a jump no more than the ``cap`` quantile); without: the sign
    test on the dates won."""
    from vforge.evaluation.significance import diebold_mariano

    base, (a, b) = date_losses(true, dates, candidate, reference)
    decided = a != b
    won, n = int((a < b)[decided].sum()), int(decided.sum())
    if cap is None:
        return won, n, sign_test((a < b)[decided])
    weight = capped_weights(base, cap)  # on persistence's loss, as capped_ratio weighs
    p = diebold_mariano(a * weight, b * weight).pvalue
    return won, n, float(p) if p == p else 1.0


def shrink_ridge(oos_change: np.ndarray, true_change: np.ndarray, dates: np.ndarray, *, weights: list[float],
                 trim: float, tolerance: float, max_p: float, cap: float | None = None,
                 alphas: list[float] | None = None, se: float = 0.0) -> dict:
    """The share of the ridge's predicted change to keep, and its penalty, chosen on its out-of-sample predictions of
    the inner walk-forward folds (``oos_change``: one column per penalty of ``alphas``, or one column): among the
    (penalty, share) pairs within ``tolerance`` of the best score, or within ``se`` standard errors of their score's
    difference from the best's across the dates where that is larger (``score_se``; the one-standard-error rule of
    cross-validation: the thinner and noisier the evidence, the simpler the choice), the simplest (the smallest
    share, then the largest penalty); 0 (persistence) unless it beats persistence by ``tolerance`` and clearly across the fold dates
    (``wins_over``'s p <= ``max_p``). ``alpha`` of the result is the chosen pair's penalty (with persistence, the
    best-scoring pair's: the ridge may still serve other rows)."""
    oos = np.asarray(oos_change, dtype=np.float64)
    oos = oos[:, None] if oos.ndim == 1 else oos
    alphas = [math.nan] if alphas is None else [float(a) for a in alphas]
    if len(alphas) != oos.shape[1]:
        raise ValueError(f"{oos.shape[1]} columns of fold predictions for {len(alphas)} penalties")
    grid = sorted(set(float(w) for w in weights) | {0.0, 1.0})
    scores = {(i, w): _score(w * oos[:, i], true_change, dates, trim, cap) for i in range(len(alphas)) for w in grid}
    top = min(scores, key=lambda p: scores[p])
    share = lambda p: p[1] * oos[:, p[0]]  # noqa: E731
    margin = {p: max(tolerance, se * score_se(share(p), share(top), true_change, dates, cap)) if se and p != top else
              tolerance for p in scores}
    i, w = min((p for p, v in scores.items() if v <= scores[top] + margin[p]), key=lambda p: (p[1], -alphas[p[0]]))
    top = min((p for p in scores if p[1] > 0), key=lambda p: (scores[p], p[1], -alphas[p[0]]))
    if not w:
        i = top[0]
    penalty = "" if math.isnan(alphas[i]) else f" (penalty {alphas[i]:g})"
    won, n, p = wins_over(w * oos[:, i], np.zeros_like(true_change), true_change, dates, cap)
    if w and (scores[(i, w)] >= 1.0 - tolerance or p > max_p):
        why = (f"the ridge's best share ({w:g}{penalty}, score {scores[(i, w)]:.3f}) did not beat persistence "
               f"clearly on the fold dates (won {won}/{n}, {_test(cap)} p {p:.2g}): persistence")
        w = 0.0
    elif w:
        why = (f"{w:g} x ridge{penalty}: won {won}/{n} fold dates over persistence ({_test(cap)} p {p:.2g}), score "
               f"{scores[(i, w)]:.3f}")
    else:
        why = "no share of the ridge beat persistence on the fold dates: persistence"
    return {"w_linear": w, "alpha": alphas[i], "score": scores[(i, w)],
            "scores": {(alphas[j], x): v for (j, x), v in scores.items()}, "why": why, "won": won, "dates": n}


KINDS = {"prev": "previously quoted rows", "new": "contracts new on the date", "all": "all rows"}
# The ridge beside a network: conf/model/linear.yaml's defaults, one ridge per kind of rows as there
RIDGE = {"_target_": "vforge.models.linear.Ridge", "split_by": "prev_iv_missing"}


def ridge_share(oos: np.ndarray, true_fold: np.ndarray, fold_dates: np.ndarray, *, alphas: list[float],
                **rule: Any) -> dict:
    """``shrink_ridge`` on one kind of rows' fold predictions (``oos``: one column per penalty of ``alphas``), or
    persistence where that kind has no fold rows."""
    if not len(oos):
        return {"w_linear": 0.0, "alpha": math.nan, "why": "too few dates for inner folds: persistence", "won": 0,
                "dates": 0}
    return shrink_ridge(oos, true_fold, fold_dates, alphas=alphas, **rule)


def decide(kind: str, *, simple: dict, fold_dates: np.ndarray, own: np.ndarray, linear: np.ndarray | None,
           true_val: np.ndarray, val_dates: np.ndarray, model_name: str, weights: list[float], trim: float,
           tolerance: float, max_p: float, cap: float | None) -> dict:
    """The weights for one kind of rows (``KINDS``): the simple choice from the ridge's out-of-sample fold
    predictions (``simple``: ``ridge_share``'s, on ``fold_dates``), replaced by a blend with the network only if the
    validation dates say so clearly (see ``gate``). Arrays are of that kind's rows only; ``linear`` (the ridge served,
    on the validation rows) None for ``model=linear``. The result's ``alpha`` is the ridge's penalty the choice was
    made with (NaN: no fold dates)."""
    n_fold = len(np.unique(fold_dates))
    out = {"w_model": 0.0, "w_linear": simple["w_linear"], "alpha": simple["alpha"],
           "why": f"{simple['why']} (on {n_fold} inner walk-forward fold dates)"}
    if linear is None or not len(own):
        return out
    simple_val = simple["w_linear"] * linear
    simple_score = _score(simple_val, true_val, val_dates, trim, cap)
    blend = choose_blend(own, linear, true_val, val_dates, weights=weights, trim=trim, tolerance=tolerance, cap=cap)
    if blend["w_model"] == 0:
        out["why"] += f"; on {len(np.unique(val_dates))} validation dates the best blend leaves {model_name} out"
        return out
    blended = blend["w_model"] * own + blend["w_linear"] * linear
    won, n, p = wins_over(blended, simple_val, true_val, val_dates, cap)
    penalty = f" (penalty {simple['alpha']:g})" if math.isfinite(simple["alpha"]) else ""
    named = f"{blend['w_model']:g} x {model_name}" + (f" + {blend['w_linear']:g} x ridge{penalty}" if blend["w_linear"]
                                                      else "")
    evidence = (f"on {len(np.unique(val_dates))} validation dates {named} scored {blend['score']:.3f} against "
                f"{simple_score:.3f} and won {won}/{n} dates ({_test(cap)} p {p:.2g}, needed <= {max_p:g})")
    if blend["score"] < simple_score - tolerance and p <= max_p:
        return {"w_model": blend["w_model"], "w_linear": blend["w_linear"], "alpha": out["alpha"],
                "why": f"the network earns its place: {evidence}"}
    out["why"] += f"; the network did not earn its place: {evidence}"
    return out


def clip_like(y_train: np.ndarray, prev_train: np.ndarray, y: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """``y`` clipped, each kind (previously quoted: ``prev``, or new contracts) to the range of the (winsorized)
    train targets of its kind, as the training targets were; a kind without train rows to the whole range."""
    def bounds(kind: np.ndarray) -> tuple[float, float]:
        part = y_train[kind] if kind.any() else y_train
        return float(part.min()), float(part.max())

    return np.clip(y, *kind_bounds(~prev, bounds(prev_train), bounds(~prev_train)))


def gate(model: nn.Module, data: Dataset, *, model_cfg: dict, model_name: str, weights: list[float], trim: float,
         tolerance: float, max_p: float = 0.05, max_p_ridge: float = 0.1, n_folds: int = 4,
         fold_fraction: float = 0.5, cap: float | None = None, se: float = 0.0,
         batch_size: int = 8192) -> tuple[nn.Module, dict | None, dict]:
    """Choose what of a trained change model, the ridge and persistence to keep, on the evidence each has; separately
    for previously quoted rows (a change over persistence) and for contracts new on the date (a change over the
    previous surface), each kind on its own rows, so the large errors of new contracts do not decide for the others.

    1. The ridge (``conf/model/linear.yaml`` defaults, closed form) and how much of its change to keep are chosen on
       inner walk-forward folds over the training and validation dates (``shrink_ridge``): many out-of-sample
       dates, cheap to refit, kept only if it beats persistence with p <= ``max_p_ridge``. That is the *simple*
       choice.
    2. The network has one block of out-of-sample evidence, its validation dates (where it was also early-stopped).
       A blend ``w_model x model + w_linear x ridge`` (the ridge fit on train: out of sample there too) replaces the
       simple choice only if its score is better by ``tolerance`` *and* significantly so across the
       validation dates (``wins_over``'s one-sided p <= ``max_p``, a stricter bar than the ridge's ``max_p_ridge``):
       thin evidence keeps the simpler model.

    The ridge served is the one fit on train. Returns ``(module, model_config,
    choice)``: the module to evaluate and save (``model`` itself when the choice is the model alone everywhere), the
    config that rebuilds it (None: ``model_cfg`` unchanged) and the choice with its note.
    """
    from vforge.models.linear import Blend, Ridge
    from vforge.training.loop import predict

    is_linear = isinstance(model, Ridge)
    linear_cfg = model_cfg if is_linear else RIDGE
    tr, va = data.train, data.val
    true_val = (va.iv - va.base) / data.y_scale  # the change in target units (change targets: center 0)
    val_dates = va.aux["quote_date_idx"].numpy()

    def make() -> Ridge:
        from hydra.utils import instantiate

        ridge = instantiate(linear_cfg, n_num=data.n_num, cat_cardinalities=data.cat_cardinalities, d_out=1)
        assert isinstance(ridge, Ridge)
        ridge.prepare(data)
        return ridge

    # 1. the ridge's out-of-sample predictions on inner walk-forward folds over train + validation, one column per
    # penalty: its penalty and its share are chosen together on these dates, with the score and test of the shares
    y_tr = tr.y.reshape(-1).double()
    x_num = torch.cat([tr.x_num, va.x_num])
    x_cat = None if tr.x_cat is None or va.x_cat is None else torch.cat([tr.x_cat, va.x_cat])
    prev_tr, prev_val = np.isfinite(tr.persistence), np.isfinite(va.persistence)
    y_fit = torch.cat([y_tr, torch.as_tensor(clip_like(y_tr.numpy(), prev_tr, true_val, prev_val))])
    true_all = np.concatenate([(tr.iv - tr.base) / data.y_scale, true_val])
    dates = np.concatenate([tr.aux["quote_date_idx"].numpy(), val_dates])
    prev_all = np.concatenate([prev_tr, prev_val])
    blocks = inner_folds(dates, n_folds, fold_fraction)
    probe = make()
    alphas = list(probe.alphas)
    fold_rows, oos = probe.fold_path(x_num, x_cat, y_fit, dates, blocks, alphas)  # fit on the dates before each
    names = list(data.feature_names)
    new_column = names.index("prev_iv_missing") if "prev_iv_missing" in names else None
    kinds = {"prev": (prev_all, prev_val), "new": (~prev_all, ~prev_val)} if new_column is not None else \
        {"all": (np.ones_like(prev_all), np.ones_like(prev_val))}  # the blend cannot tell the kinds apart
    # the penalty: chosen on the first kind's rows (previously quoted rows, where the ridge is judged against
    # persistence); a ridge split by that kind (``split_by``: two independent ridges) chooses the other kind's on its
    # rows, one split by nothing uses the first's for every kind
    per_kind = probe.split_by == "prev_iv_missing" and new_column is not None
    rule = {"weights": weights, "trim": trim, "tolerance": tolerance, "max_p": max_p_ridge, "cap": cap, "se": se}

    def share(kind: str, cols: list[float]) -> dict:
        f = fold_rows & kinds[kind][0]
        return ridge_share(oos[f][:, [alphas.index(a) for a in cols]], true_all[f], dates[f], alphas=cols, **rule)

    first, *others = kinds
    simple = {first: share(first, alphas)}
    alpha = simple[first]["alpha"]
    simple |= {kind: share(kind, alphas if per_kind or math.isnan(alpha) else [alpha]) for kind in others}
    alpha_new = simple["new"]["alpha"] if per_kind and math.isfinite(simple["new"]["alpha"]) else alpha

    # 2. the network and the ridge fit on train with those penalties (the one served: refit on train + validation it
    # scored worse on the default market's test block, 0.881 against 0.870 of persistence), on the validation dates;
    # without fold dates the ridge chooses its own penalties (``Ridge.fit_closed_form``)
    own = predict(model, va, batch_size)
    linear = make()
    linear.fit_closed_form(tr.x_num, tr.x_cat, tr.y, tr.aux["quote_date_idx"].numpy(),
                           alpha=None if math.isnan(alpha) else (alpha, alpha_new) if per_kind else alpha)
    lin_val = None if is_linear else predict(linear, va, batch_size)
    choices = {kind: decide(kind, simple=simple[kind], fold_dates=dates[fold_rows & on_fold], own=own[on_val],
                            linear=None if lin_val is None else lin_val[on_val], true_val=true_val[on_val],
                            val_dates=val_dates[on_val], model_name=model_name, weights=weights, trim=trim,
                            tolerance=tolerance, max_p=max_p, cap=cap)
               for kind, (on_fold, on_val) in kinds.items()}
    prev = choices.get("prev", choices.get("all"))
    new = choices.get("new", prev)
    assert prev is not None and new is not None
    if (prev["w_model"], prev["w_linear"]) == (new["w_model"], new["w_linear"]):
        new_column = None
    choice: dict[str, Any] = {"w_model": prev["w_model"], "w_linear": prev["w_linear"], "w_model_new": new["w_model"],
                              "w_linear_new": new["w_linear"], "alpha": alpha, "alpha_new": alpha_new,
                              "kinds": choices}
    choice["note"] = describe(choice, model_name)
    if all(c["w_model"] == 1.0 and c["w_linear"] == 0.0 for c in (prev, new)):
        return model, None, choice
    cfg: dict[str, Any] = {"_target_": "vforge.models.linear.Blend", "_recursive_": False, "model": model_cfg,
                           "linear": linear_cfg, "w_model": prev["w_model"], "w_linear": prev["w_linear"]}
    if new_column is not None:
        cfg |= {"w_model_new": new["w_model"], "w_linear_new": new["w_linear"], "new_column": new_column}
    out = Blend(n_num=data.n_num, cat_cardinalities=data.cat_cardinalities, d_out=1,
                **{k: v for k, v in cfg.items() if not k.startswith("_")})
    out.model.load_state_dict(model.state_dict())
    out.linear.load_state_dict(linear.state_dict())
    device = next(model.parameters()).device
    return out.to(device).eval(), cfg, choice


@dataclass
class DoNoHarm:
    """What ``do_no_harm`` kept: the module to evaluate and save, the run config that rebuilds it, the note printed
    under the results table and the metrics it adds (``do_no_harm/w_model``, ``do_no_harm/w_linear``)."""

    module: nn.Module
    config: dict[str, Any]
    note: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def do_no_harm(settings: Any, model: nn.Module, data: Dataset, config: dict[str, Any], *, d_out: int,
               batch_size: int = 8192) -> DoNoHarm:
    """The do-no-harm step of a training run (``settings``: ``cfg.do_no_harm``; ``config``: the resolved run config,
    its ``model`` and ``run_name`` used): the trained model unchanged where the step does not apply (off, a level
    target, a multi-output loss, no validation rows), else the blend ``gate`` chooses."""
    if not (settings and settings.get("enabled") and data.target == "change" and d_out == 1 and len(data.val)):
        return DoNoHarm(model, config)
    module, blend_cfg, choice = gate(model, data, model_cfg=config["model"], model_name=str(config.get("run_name")),
                                     weights=list(settings["weights"]), trim=float(settings["trim"]),
                                     tolerance=float(settings["tolerance"]), max_p=float(settings.get("max_p", 0.05)),
                                     max_p_ridge=float(settings.get("max_p_ridge", 0.1)),
                                     n_folds=int(settings.get("n_folds", 4)),
                                     fold_fraction=float(settings.get("fold_fraction", 0.5)),
                                     cap=None if settings.get("cap") is None else float(settings["cap"]),
                                     se=float(settings.get("se", 0.0)), batch_size=batch_size)
    if blend_cfg is not None:
        config = {**config, "model": blend_cfg}
    metrics = {f"do_no_harm/{k}": float(choice[k]) for k in ("w_model", "w_linear", "w_model_new", "w_linear_new")}
    for key in ("alpha", "alpha_new"):
        if math.isfinite(choice[key]):
            metrics[f"do_no_harm/ridge_{key}"] = float(choice[key])
    return DoNoHarm(module, config, "\n" + choice["note"], metrics)
