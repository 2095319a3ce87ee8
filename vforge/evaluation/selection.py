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

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from vforge.evaluation.metrics import capped_ratio
from vforge.training.gating import wins_over

T = TypeVar("T")


def candidates(fallback: T, models: Iterable[T], size: Callable[[T], tuple[float, float]], ensemble: T | None) -> list[T]:
    """AutoML's candidates in the order ``pick`` reads them: the fallback (``model=linear``, or the baseline), the
    searched ``models`` simplest first by ``size`` (number of parameters, then validation RMSE), the ensemble."""
    return [fallback, *sorted((m for m in models if m is not fallback), key=size),
            *([ensemble] if ensemble is not None else [])]


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
    """The candidate to serve among ``names`` (simplest first; the first is the fallback), from their validation IV
    levels ``val_preds`` against ``true``, as changes over ``base``, per quote date ``dates``: judged on ``rows`` (a
    mask, the previously quoted rows; None: all). A candidate no worse there (by ``tolerance``) may also win on all
    rows with the same evidence: a network that keeps the ridge's change on quoted rows but predicts new contracts
    better."""
    if len(names) != len(val_preds) or not names:
        raise ValueError(f"{len(names)} names for {len(val_preds)} predictions")
    every = np.ones(len(true), dtype=bool)
    on = every if rows is None or not np.any(rows) else np.asarray(rows, dtype=bool)
    views = {"": on} | ({"all rows": every} if not on.all() else {})

    def view(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[float]]:
        true_change, day = (true - base)[mask], np.asarray(dates)[mask]
        change = [(np.asarray(p) - base)[mask] for p in val_preds]
        return true_change, day, change, [capped_ratio(c, true_change, day, cap) for c in change]

    judged = {k: view(m) for k, m in views.items()}
    scores = dict(zip(names, judged[""][3]))
    best = 0
    why = {names[0]: f"the simplest candidate, the fallback (score {scores[names[0]]:.3f})"}
    for j in range(1, len(names)):
        lines, same, won_any = [], True, False
        for k, (true_change, day, change, score) in judged.items():
            won, n, p = wins_over(change[j], change[best], true_change, day, cap)
            a, b = score[j], score[best]
            same &= n == 0
            lines.append(f"{k + ': ' if k else ''}score {a:.3f} vs {b:.3f} for {names[best]}, won {won}/{n} "
                         f"validation dates (DM p {p:.2g}, needed <= {max_p:g})")
            won_any |= n > 0 and a < b - tolerance and p <= max_p
            if k == "" and a > b + tolerance:  # worse on the rows that matter most: all rows cannot make up for it
                break
        evidence = "; ".join(lines)
        if same:  # e.g. a network whose do-no-harm step kept the ridge's share alone
            why[names[j]] = f"the same validation predictions as {names[best]}"
        elif won_any:
            why[names[j]] = f"replaced {names[best]}: {evidence}"
            best = j
        else:
            why[names[j]] = f"did not earn its place over {names[best]}: {evidence}"
    return Pick(best, names[best], scores, why)
