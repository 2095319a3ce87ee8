"""Do no harm, last step (``do_no_harm.lightgbm``): LightGBM blended into the model ``gating.do_no_harm`` kept, when it
earns its place on the validation dates. Apart from ``gating`` because it reads the leaderboard's LightGBM fit and
AutoML's pick rule, which read ``gating`` themselves."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from vforge.training.gating import DoNoHarm

if TYPE_CHECKING:
    from vforge.data.dataset import Dataset


def blend_lightgbm(settings: Any, kept: DoNoHarm, data: Dataset, *, d_out: int, seed: int = 0,
                   n_threads: int = 2) -> DoNoHarm:
    """Do no harm, last step (``do_no_harm.lightgbm``): LightGBM on the same features and target
    (``leaderboard.lightgbm_fit``, early-stopped on validation), blended with the kept model and the baseline by
    convex weights fit on the validation dates, each date capped as the scores cap it (``ensemble.fit_capped``, as
    AutoML's ensemble); the blend (``vforge.models.ensemble``) replaces the kept model only if, judged on its
    cross-fitted validation predictions, it scores better by ``tolerance`` with DM p <= ``max_p``
    (``selection.pick``). LightGBM's errors are the least like a network's: on the results page's folds this blend
    lowered the default command's error on every data option. Not applied where do no harm is not (off, a level
    target, a multi-output model) or without lightgbm installed (said in the note)."""
    if not (settings and settings.get("enabled") and settings.get("lightgbm") and data.target == "change"
            and d_out == 1 and len(data.val)):
        return kept
    from vforge.evaluation import leaderboard as L
    from vforge.evaluation.ensemble import fit_capped
    from vforge.evaluation.selection import pick
    from vforge.models.ensemble import assemble

    module = kept.module.eval()
    fit = L.lightgbm_fit(data, seed=seed, n_threads=n_threads)
    if fit is None:
        return DoNoHarm(kept.module, kept.config, kept.note + "\n  LightGBM blend: lightgbm is not installed "
                        "(pip install lightgbm)", kept.metrics)
    va, cap = data.val, float(settings.get("cap") or 0.9)
    own = L.levels(module, data)
    members = {s: np.stack([own[s], fit.pred[s], getattr(data, s).base], axis=1) for s in ("val", "test")}
    dates = va.aux["quote_date_idx"].numpy()
    w, evidence = fit_capped(members["val"], va.iv, va.base, dates, cap)
    name = str(kept.config.get("run_name") or "model")
    chosen = pick([name, "blend"], [own["val"], evidence], va.iv, va.base, dates, np.isfinite(va.persistence),
                  tolerance=float(settings["tolerance"]), max_p=float(settings.get("max_p", 0.05)), cap=cap)
    weights = f"{w[0]:.2f} x {name} + {w[1]:.2f} x LightGBM ({fit.booster.best_iteration} trees) + {w[2]:.2f} x baseline"
    if chosen.name != "blend":
        note = f"\n  LightGBM blend ({weights}, weights fit on validation) not kept: {chosen.why['blend']}"
        return DoNoHarm(kept.module, kept.config, kept.note + note, kept.metrics | {"do_no_harm/w_lightgbm": 0.0})
    ensemble, model_cfg = assemble([(kept.config["model"], module, float(w[0]))], fit.booster, float(w[1]),
                                   float(w[2]), -data.y_center / data.y_scale, n_num=data.n_num,
                                   cat_cardinalities=data.cat_cardinalities)
    L.check_reproduces(ensemble, data, members["test"] @ w, "the LightGBM blend")  # the saved model is what was scored
    note = f"\n  LightGBM blend kept: {weights} (weights fit on validation): {chosen.why['blend']}"
    return DoNoHarm(ensemble, {**kept.config, "model": model_cfg}, kept.note + note,
                    kept.metrics | {"do_no_harm/w_lightgbm": float(w[1]), "do_no_harm/w_kept": float(w[0])})
