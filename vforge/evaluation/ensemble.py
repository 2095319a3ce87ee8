"""Weighted ensembles of IV predictions, weights fit on validation only."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize


def fit_weights(val_preds: np.ndarray, val_true: np.ndarray) -> np.ndarray:
    """Convex weights (>= 0, summing to 1) minimizing the validation MSE of ``val_preds @ w``.

    Shape:
        val_preds: (n_val, n_models) IV levels of each member on the validation split
        val_true: (n_val,)
        returns: (n_models,)

    The search starts from the best single member and only accepts a better point, so the ensemble
    is never worse than its best member on validation. Test data never enters.

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
    k = p.shape[1]
    mse = lambda w: float(np.mean((p @ w - y) ** 2))  # noqa: E731
    single = [mse(np.eye(k)[j]) for j in range(k)]
    start = np.eye(k)[int(np.argmin(single))]
    if k == 1:
        return start
    # scale the objective to O(1) so SLSQP's tolerances mean something for errors of ~1e-2
    scale = max(min(single), 1e-12)
    res = minimize(lambda w: mse(w) / scale, start, jac=lambda w: 2 * p.T @ (p @ w - y) / len(y) / scale,
                   method="SLSQP", bounds=[(0.0, 1.0)] * k,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
                   options={"ftol": 1e-12, "maxiter": 500})
    w = np.clip(res.x, 0.0, None)
    w = w / w.sum() if w.sum() > 0 else start
    return w if mse(w) <= mse(start) else start
