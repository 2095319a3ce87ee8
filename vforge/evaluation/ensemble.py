"""Weighted ensembles of IV predictions, weights fit on validation only."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from vforge.evaluation.metrics import capped_row_weights


def fit_weights(val_preds: np.ndarray, val_true: np.ndarray, sample_weight: np.ndarray | None = None) -> np.ndarray:
    """Convex weights (>= 0, summing to 1) minimizing the validation MSE of ``val_preds @ w``, each row weighted by
    ``sample_weight`` (e.g. ``metrics.capped_row_weights``: a jump date counts no more than a capped share).

    Shape:
        val_preds: (n_val, n_models) IV levels of each member on the validation split
        val_true: (n_val,)
        sample_weight: (n_val,) non-negative, or None (every row alike)
        returns: (n_models,)

    The search starts from the best single member and only accepts a better point, so the ensemble
    is never worse than its best member on validation (in the weighted MSE). Test data never enters.

    >>> y = np.array([0.2, 0.3, 0.25, 0.22])
    >>> fit_weights(np.stack([y, y + 0.05], axis=1), y).round(6).tolist()
    [1.0, 0.0]
    """
    p = np.asarray(val_preds, dtype=np.float64)
    y = np.asarray(val_true, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"val_preds must be (n_val, n_models) with n_val={y.shape[0]}, got {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("val_preds has NaN or inf: an ensemble member failed on validation rows")
    s = np.ones_like(y) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if s.shape != y.shape or not (np.isfinite(s).all() and (s >= 0).all() and s.sum() > 0):
        raise ValueError(f"sample_weight must be ({y.shape[0]},), finite, >= 0 and not all 0")
    s = s / s.sum()
    k = p.shape[1]
    mse = lambda w: float(s @ (p @ w - y) ** 2)  # noqa: E731
    single = [mse(np.eye(k)[j]) for j in range(k)]
    start = np.eye(k)[int(np.argmin(single))]
    if k == 1:
        return start
    # scale the objective to O(1) so SLSQP's tolerances mean something for errors of ~1e-2
    scale = max(min(single), 1e-12)
    res = minimize(lambda w: mse(w) / scale, start, jac=lambda w: 2 * p.T @ (s * (p @ w - y)) / scale,
                   method="SLSQP", bounds=[(0.0, 1.0)] * k,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
                   options={"ftol": 1e-12, "maxiter": 500})
    w = np.clip(res.x, 0.0, None)
    w = w / w.sum() if w.sum() > 0 else start
    return w if mse(w) <= mse(start) else start


def cross_fit(val_preds: np.ndarray, val_true: np.ndarray, dates: np.ndarray, sample_weight: np.ndarray | None = None,
              n_blocks: int = 5) -> np.ndarray:
    """The ensemble's out-of-sample validation predictions: the validation dates cut into ``n_blocks`` contiguous
    blocks, each block predicted with weights fit (``fit_weights``) on the other blocks' rows. Judging the
    ensemble on these, not on the rows its weights were fit on, is what lets it compete fairly with its members.
    With fewer than two dates there is nothing to hold out: the in-sample fit.

    Shape: as ``fit_weights``; ``dates`` (n_val,) any sortable date key; returns (n_val,).
    """
    p = np.asarray(val_preds, dtype=np.float64)
    s = np.ones(len(p)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    days = np.unique(dates)
    if len(days) < 2:
        return p @ fit_weights(p, val_true, s)
    out = np.empty(len(p))
    for block in np.array_split(days, min(n_blocks, len(days))):
        held = np.isin(dates, block)
        rest = ~held & (s > 0)
        w = fit_weights(p[rest], np.asarray(val_true)[rest], s[rest]) if rest.any() else \
            fit_weights(p, val_true, s)
        out[held] = p[held] @ w
    return out


def fit_capped(val_preds: np.ndarray, val_true: np.ndarray, val_base: np.ndarray, dates: np.ndarray,
               cap: float | None) -> tuple[np.ndarray, np.ndarray]:
    """AutoML's ensemble fit: convex weights (``fit_weights``) with each validation date's rows weighted as
    ``capped_ratio`` weighs them (``metrics.capped_row_weights`` of the change over ``val_base``: a jump date
    counts no more than the ``cap`` quantile of the dates; every row alike when ``cap`` is None), and the
    ensemble's cross-fitted validation predictions (``cross_fit``), its evidence for a pick.

    Shape: as ``fit_weights``; ``val_base`` and ``dates`` (n_val,); returns the weights (n_models,) and the
    cross-fitted predictions (n_val,).
    """
    weight = None if cap is None else capped_row_weights(np.asarray(val_true) - np.asarray(val_base), dates, cap)
    return fit_weights(val_preds, val_true, weight), cross_fit(val_preds, val_true, dates, weight)
