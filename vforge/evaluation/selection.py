"""AutoML's pick: the simplest candidate, unless a more complex one earns its place on the validation dates.

Candidates come simplest first; the first is the fallback. In AutoML that is ``model=linear`` after its do-no-harm
step (persistence, unless the ridge beat it on inner walk-forward folds over the training and validation dates: more
out-of-sample dates than the validation block alone holds), then the searched models (fewest parameters first),
then the ensemble. Each replaces the one picked so far only if its score is lower by ``tolerance`` *and* a one-sided
Diebold-Mariano test on the capped per-date losses says so (``gating.wins_over``, p <= ``max_p``): thin or
disagreeing evidence keeps the simpler predictor, and the leaderboard says why. The score is ``metrics.capped_ratio`` (the pooled
MSE ratio to persistence with each date's weight capped at the ``cap`` quantile: one jump cannot decide) on the
validation rows quoted the previous date (persistence's rows; all rows when there are none), of each candidate's
change over the baseline.

The validation block is also where the searched models were chosen among trials and early-stopped, and where the
ensemble's weights are fit: pass the ensemble's cross-fitted predictions (``ensemble.cross_fit``), so the rows its
weights were fit on are not its evidence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vforge.evaluation.metrics import capped_ratio
from vforge.training.gating import wins_over


@dataclass
class Pick:
    """``index`` and ``name`` of the candidate picked, each candidate's ``score`` and one line a candidate on why it
    was or was not picked (``why``)."""

    index: int
    name: str
    scores: dict[str, float]
    why: dict[str, str]


def pick(names: list[str], val_preds: list[np.ndarray], true: np.ndarray, base: np.ndarray, dates: np.ndarray,
         rows: np.ndarray | None = None, *, tolerance: float, max_p: float, cap: float) -> Pick:
    """The candidate to serve among ``names`` (simplest first; the first is the fallback),
    from their validation IV levels ``val_preds`` against ``true``, as changes over ``base``, on ``rows`` (a mask;
    None: all), per quote date ``dates``."""
    if len(names) != len(val_preds) or not names:
        raise ValueError(f"{len(names)} names for {len(val_preds)} predictions")
    on = np.ones(len(true), dtype=bool) if rows is None or not np.any(rows) else np.asarray(rows, dtype=bool)
    true_change, day = (true - base)[on], np.asarray(dates)[on]
    change = [(np.asarray(p) - base)[on] for p in val_preds]
    scores = {n: capped_ratio(c, true_change, day, cap) for n, c in zip(names, change)}
    best = 0
    why = {names[0]: f"the simplest candidate, the fallback (score {scores[names[0]]:.3f})"}
    for j in range(1, len(names)):
        won, n, p = wins_over(change[j], change[best], true_change, day, cap)
        a, b = scores[names[j]], scores[names[best]]
        evidence = (f"score {a:.3f} vs {b:.3f} for {names[best]}, won {won}/{n} validation dates "
                    f"(DM p {p:.2g}, needed <= {max_p:g})")
        if n == 0:  # e.g. a network whose do-no-harm step kept the ridge's share alone
            why[names[j]] = f"the same validation predictions as {names[best]}"
        elif a < b - tolerance and p <= max_p:
            why[names[j]] = f"replaced {names[best]}: {evidence}"
            best = j
        else:
            why[names[j]] = f"did not earn its place over {names[best]}: {evidence}"
    return Pick(best, names[best], scores, why)
