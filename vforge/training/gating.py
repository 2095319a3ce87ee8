"""Do no harm: how much of a model's predicted change to keep, chosen by a rule one jump cannot dominate.

The prediction of a change model is persistence plus a change. ``choose_blend`` scores blends
``w_model * model + w_linear * linear`` of the predicted changes (``w_model + w_linear <= 1``; ``0, 0`` is
persistence) by a trimmed mean of per-date loss ratios to persistence, so a date with a volatility jump counts
as one date, not as most of the squared error; among blends scoring within ``tolerance`` of the best it keeps the
simplest (persistence, then the linear model alone, then anything with the model; fewer weight before more).
A blend that cannot beat persistence leaves persistence.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vforge.evaluation.metrics import per_date_ratio, robust_score

if TYPE_CHECKING:
    from torch import nn

    from vforge.data.dataset import Dataset


def choose_blend(model_change: np.ndarray, linear_change: np.ndarray | None, true_change: np.ndarray,
                 dates: np.ndarray, *, weights: list[float], trim: float, tolerance: float) -> dict:
    """The blend to keep, and why. Returns ``w_model, w_linear, score`` (of the chosen blend), ``scores`` (of the
    model alone, the linear model alone, persistence) and ``why``."""
    grid = sorted(set(float(w) for w in weights) | {0.0, 1.0})
    pairs = [(m, w) for m, w in itertools.product(grid, grid if linear_change is not None else [0.0]) if m + w <= 1 + 1e-9]
    lin = np.zeros_like(model_change) if linear_change is None else linear_change
    score = {p: robust_score(per_date_ratio(p[0] * model_change + p[1] * lin, true_change, dates), trim) for p in pairs}
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


def describe(choice: dict, model_name: str, n_dates: int, trim: float) -> str:
    """One paragraph for the results table: what was chosen and why."""
    parts = [f"{w:g} x {name}" for w, name in ((choice["w_model"], model_name), (choice["w_linear"], "linear")) if w]
    blend = " + ".join(parts) + " (rest: persistence)" if parts else "persistence"
    scores = ", ".join(f"{k} {v:.3f}" for k, v in choice["scores"].items())
    return (f"do no harm: predicted change = {blend}; {choice['why']}. Score: trimmed mean ({trim:g} each end) over "
            f"{n_dates} validation dates of the per-date MSE ratio to persistence: chosen {choice['score']:.3f}; "
            f"{scores}")


def gate(model: nn.Module, data: Dataset, *, model_cfg: dict, model_name: str, weights: list[float], trim: float, tolerance: float,
         batch_size: int = 8192) -> tuple[nn.Module, dict | None, dict]:
    """Blend a trained change model with the ridge (``conf/model/linear.yaml`` defaults, fit in closed form on the
    training rows) and persistence, as ``choose_blend`` picks on the validation dates.

    Returns ``(module, model_config, choice)``: the module to evaluate and save (``model`` itself when the choice
    is the model alone), the config that rebuilds it (None: ``model_cfg`` unchanged) and the choice with its note.
    """

    from vforge.models.linear import Blend, Ridge
    from vforge.training.loop import predict

    linear_cfg = {"_target_": "vforge.models.linear.Ridge"}
    is_linear = isinstance(model, Ridge)
    true = (data.val.iv - data.val.base) / data.y_scale  # the change in target units (change targets: center 0)
    dates = data.val.aux["quote_date_idx"].numpy()
    own = predict(model, data.val, batch_size)
    linear = None
    if not is_linear:
        linear = Ridge(n_num=data.n_num, cat_cardinalities=data.cat_cardinalities, d_out=1)
        linear.fit_closed_form(data.train.x_num, data.train.x_cat, data.train.y,
                               data.train.aux["quote_date_idx"].numpy())
    choice = choose_blend(own, None if linear is None else predict(linear, data.val, batch_size), true, dates,
                          weights=weights, trim=trim, tolerance=tolerance)
    choice["note"] = describe(choice, model_name, len(np.unique(dates)), trim)
    if choice["w_model"] == 1.0 and choice["w_linear"] == 0.0:
        return model, None, choice
    cfg = {"_target_": "vforge.models.linear.Blend", "_recursive_": False, "model": model_cfg,
           "linear": linear_cfg, "w_model": choice["w_model"], "w_linear": choice["w_linear"]}
    blend = Blend(n_num=data.n_num, cat_cardinalities=data.cat_cardinalities, d_out=1, model=model_cfg,
                  linear=linear_cfg, w_model=choice["w_model"], w_linear=choice["w_linear"])
    blend.model.load_state_dict(model.state_dict())
    if linear is not None:
        blend.linear.load_state_dict(linear.state_dict())
    device = next(model.parameters()).device
    return blend.to(device).eval(), cfg, choice


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
                                     tolerance=float(settings["tolerance"]), batch_size=batch_size)
    if blend_cfg is not None:
        config = {**config, "model": blend_cfg}
    return DoNoHarm(module, config, "\n" + choice["note"],
                    {"do_no_harm/w_model": choice["w_model"], "do_no_harm/w_linear": choice["w_linear"]})
