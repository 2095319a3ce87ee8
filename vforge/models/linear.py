"""Ridge regression on the features and their pairwise products, fit in closed form; the reference to beat.

On thin or regime-changing real chains a ridge on the change over persistence, with spot-return x moneyness and
spot-return / sqrt(tau) interactions, was the only model of those tried to beat persistence out of sample (issue 10).
Here every pairwise product of the (scaled) inputs is a column, which holds those interactions whatever the feature
set, and the penalty is chosen on walk-forward folds inside the training dates (``fit_closed_form``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from vforge.data.dataset import inner_folds
from vforge.evaluation.metrics import capped_ratio, per_date_ratio, robust_score
from vforge.models.base import Model


class Ridge(Model):
    """``y = w . z(x)`` with ``z`` the inputs, their pairwise products, one-hot categories and a constant, each column
    scaled to unit RMS on the training rows.

    Trains like any model through ``forward`` (the model contract), but ``fit_closed_form`` is what the training
    entry point calls: it solves the ridge normal equations for each penalty in ``alphas`` on expanding walk-forward
    folds over the training dates, picks one with a rule that one jump cannot dominate (``robust_score``; the
    largest penalty within ``tolerance`` of the best: thin evidence prefers the simpler fit; an infinite penalty, i.e.
    persistence, when none beats predicting no change) and refits on every training row.

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) or None
        returns: (batch, d_out)

    Args:
        alphas: penalties per training row (the normal equations are ``(Z'Z / n + alpha I) w = Z'y / n``).
        n_folds: walk-forward folds inside the training dates; they cover its last ``fold_fraction``.
        trim: share of fold dates trimmed at each end of the per-date loss ratios.
        tolerance: how much worse (in units of persistence's per-date loss) a larger penalty may score and still win.
    """

    closed_form = True
    pairs: Tensor  # buffers
    scale: Tensor

    def __init__(self, *, n_num: int, cat_cardinalities: list[int], d_out: int, interactions: bool = True,
                 alphas: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0), n_folds: int = 4,
                 fold_fraction: float = 0.5, trim: float = 0.2, tolerance: float = 0.01,
                 cap: float | None = None) -> None:
        super().__init__()
        if not alphas or any(a <= 0 for a in alphas):
            raise ValueError(f"alphas must be a non-empty list of positive penalties, got {list(alphas)}")
        if n_folds < 1 or not 0 < fold_fraction < 1:
            raise ValueError(f"need n_folds >= 1 and 0 < fold_fraction < 1, got {n_folds=}, {fold_fraction=}")
        self.n_num, self.cat_cardinalities, self.interactions = n_num, list(cat_cardinalities), interactions
        self.alphas, self.n_folds, self.fold_fraction = sorted(float(a) for a in alphas), n_folds, fold_fraction
        self.trim, self.tolerance, self.cap = trim, tolerance, cap
        pairs = torch.triu_indices(n_num, n_num) if interactions else torch.empty(2, 0, dtype=torch.long)
        self.register_buffer("pairs", pairs, persistent=False)
        d_in = 1 + n_num + pairs.shape[1] + sum(cat_cardinalities)
        self.register_buffer("scale", torch.ones(d_in))
        # A plain parameter, not an nn.Linear: int8 dynamic quantization (export) leaves it alone; products of inputs
        # span too wide a range for one int8 scale.
        self.weight = nn.Parameter(torch.zeros(d_out, d_in))
        nn.init.normal_(self.weight, std=d_in**-0.5)
        self.selection: dict = {}

    def expand(self, x_num: Tensor, x_cat: Tensor | None) -> Tensor:
        """(batch, n_num), (batch, n_cat) -> (batch, d_in) unscaled columns."""
        cols = [torch.ones_like(x_num[:, :1]), x_num, x_num[:, self.pairs[0]] * x_num[:, self.pairs[1]]]
        if x_cat is not None and self.cat_cardinalities:
            cols += [nn.functional.one_hot(x_cat[:, i].clamp(0, c - 1), c).to(x_num.dtype)
                     for i, c in enumerate(self.cat_cardinalities)]
        return torch.cat(cols, dim=1)

    def forward(self, x_num: Tensor, x_cat: Tensor | None) -> Tensor:
        return (self.expand(x_num, x_cat) / self.scale) @ self.weight.T

    def _columns(self, x_num: Tensor, x_cat: Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        """The expanded columns of these rows scaled to unit RMS on them, and that scale."""
        z = self.expand(x_num.double(), x_cat).numpy()
        scale = np.sqrt(np.mean(z**2, axis=0))
        scale = np.where(scale > 0, scale, 1.0)
        return z / scale, scale

    @torch.no_grad()
    def fold_path(self, x_num: Tensor, x_cat: Tensor | None, y: Tensor, dates: np.ndarray, blocks: list[np.ndarray],
                  alphas: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """Out-of-sample predictions on expanding walk-forward ``blocks`` (sorted, disjoint arrays of ``dates``): each
        block predicted by the fits on every row dated before it, one per penalty of ``alphas`` (inf: 0,
        persistence), with the columns scaled to unit RMS on those fit rows, as a fit on them alone scales them.
        Returns (mask of the rows predicted, predictions (n, len(alphas))); the model itself is left unchanged.

        The fits share one pass over the rows (``_prefix_normals``); a fold's column scale follows from the diagonal
        of its ``Z'Z / n``."""
        dates = np.asarray(dates)
        z = self.expand(x_num.double(), x_cat).numpy()
        yn = y.double().numpy().reshape(len(y), -1)[:, :1]
        out, mask = np.zeros((len(y), len(alphas))), np.zeros(len(y), bool)
        for block, (n, gram, rhs) in zip(blocks, _prefix_normals(z, yn, dates, [b[0] for b in blocks])):
            rows = np.flatnonzero(np.isin(dates, block))
            if not n or not len(rows):
                continue
            scale = np.sqrt(np.diag(gram))
            scale = np.where(scale > 0, scale, 1.0)
            g, r, ze = gram / np.outer(scale, scale), rhs / scale[:, None], z[rows] / scale
            out[rows] = np.column_stack([np.zeros(len(ze)) if math.isinf(a) else (ze @ _solve(g, r, a))[:, 0]
                                         for a in alphas])
            mask[rows] = True
        return mask, out

    @torch.no_grad()
    def fit_closed_form(self, x_num: Tensor, x_cat: Tensor | None, y: Tensor, dates: np.ndarray,
                        alpha: float | None = None) -> dict:
        """Choose the penalty on walk-forward folds over ``dates`` (one per row), refit on all rows; returns (and keeps
        in ``self.selection``) what was chosen and why. With ``alpha`` (inf: persistence), that penalty, chosen
        elsewhere (the do-no-harm step chooses it on its own folds), without folds."""
        z, scale = self._columns(x_num, x_cat)
        yn = y.double().numpy().reshape(len(y), -1)
        if alpha is not None:
            gram, rhs = _normal(z, yn)
            w = np.zeros((z.shape[1], yn.shape[1])) if math.isinf(alpha) else _solve(gram, rhs, alpha)
            self.scale.copy_(torch.as_tensor(scale, dtype=self.scale.dtype))
            self.weight.copy_(torch.as_tensor(w.T, dtype=self.weight.dtype))
            self.selection = {"alpha": alpha, "why": "penalty given (chosen outside this fit)"}
            return self.selection
        dates = np.asarray(dates)
        blocks = inner_folds(dates, self.n_folds, self.fold_fraction)
        candidates = [*self.alphas, math.inf]
        preds: dict[float, list[np.ndarray]] = {a: [] for a in candidates}
        evaluated = []
        normals = _prefix_normals(z, yn, dates, [b[0] for b in blocks])
        for block, (n_fit, gram, rhs) in zip(blocks, normals):
            if not n_fit:
                continue
            eval_rows = np.isin(dates, block)
            evaluated.append(eval_rows)
            z_eval = z[eval_rows]
            for a in candidates:
                preds[a].append(np.zeros(int(eval_rows.sum())) if math.isinf(a) else
                                (z_eval @ _solve(gram, rhs, a))[:, 0])
        scores = {a: self._score(preds[a], [yn[e, 0] for e in evaluated], [dates[e] for e in evaluated])
                  for a in candidates}
        finite = {a: s for a, s in scores.items() if np.isfinite(s)}
        if finite:
            best = min(finite.values())
            chosen = max(a for a, s in finite.items() if s <= best + self.tolerance)
        else:  # too few training dates for a fold: the smallest penalty the grid allows is no evidence; the largest
            chosen = self.alphas[-1]
        _, gram, rhs = normals[-1]  # every row
        w = np.zeros((z.shape[1], yn.shape[1])) if math.isinf(chosen) else _solve(gram, rhs, chosen)
        self.scale.copy_(torch.as_tensor(scale, dtype=self.scale.dtype))
        self.weight.copy_(torch.as_tensor(w.T, dtype=self.weight.dtype))
        self.selection = {
            "alpha": chosen, "scores": {str(a): round(s, 4) for a, s in scores.items()}, "fold_dates": int(
                sum(len(b) for b in blocks)),
            "why": ("no penalty beat predicting no change on the folds: persistence" if math.isinf(chosen) else
                    f"largest penalty within {self.tolerance:g} of the best "
                    f"{'capped pooled' if self.cap is not None else 'robust'} score" if finite else
                    "too few training dates for walk-forward folds: the largest penalty"),
        }
        return self.selection

    def _score(self, preds: list[np.ndarray], trues: list[np.ndarray], dates: list[np.ndarray]) -> float:
        """Score of one penalty's fold predictions (lower is better; 1 is persistence): with ``cap``, the pooled MSE
        ratio with each date's weight capped (``capped_ratio``, the do-no-harm step's score), else the trimmed
        mean of per-date ratios."""
        if not preds:
            return math.nan
        pred, true, day = np.concatenate(preds), np.concatenate(trues), np.concatenate(dates)
        if self.cap is not None:
            return capped_ratio(pred, true, day, self.cap)
        return robust_score(per_date_ratio(pred, true, day), self.trim)


def _normal(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return z.T @ z / len(z), z.T @ y / len(z)


def _prefix_normals(z: np.ndarray, y: np.ndarray, dates: np.ndarray, starts: list) -> list[tuple[int, np.ndarray,
                                                                                                  np.ndarray]]:
    """``(n, Z'Z / n, Z'y / n)`` on the rows dated before each of ``starts`` (increasing), then on every row.

    The fits of expanding walk-forward folds share their rows: each stretch of dates between consecutive starts is
    multiplied out once and a fold's sums are the sum of the stretches before it (one pass over the rows instead of
    one per fold and one for the final fit; the same sums, added in another order).
    """
    stretch = np.searchsorted(np.asarray(starts), dates, side="right")  # 0: before the first start
    n, gram, rhs = 0, np.zeros((z.shape[1], z.shape[1])), np.zeros((z.shape[1], y.shape[1]))
    out = []
    for i in range(len(starts) + 1):
        rows = stretch == i
        if rows.any():
            zs = z[rows]
            n, gram, rhs = n + len(zs), gram + zs.T @ zs, rhs + zs.T @ y[rows]
        out.append((n, gram / max(n, 1), rhs / max(n, 1)))
    return out


def _solve(gram: np.ndarray, rhs: np.ndarray, alpha: float) -> np.ndarray:
    return np.linalg.solve(gram + alpha * np.eye(len(gram)), rhs)


class Blend(Model):
    """``w_model * model + w_linear * linear``: a change model shrunk toward persistence and the ridge, as the
    do-no-harm step chose it (``vforge.training.gating``). Built from the two models' configs, so a saved run
    rebuilds it like any model.

    With ``new_column`` (the index of the ``prev_iv_missing`` feature among the numerical inputs), rows of contracts
    not quoted on the previous date (that column above 0 once scaled) take ``w_model_new``/``w_linear_new``
    instead: the change over persistence and the change over the previous surface are chosen on their own rows.

    Shape:
        returns: (batch, d_out), d_out = 1
    """

    def __init__(self, *, n_num: int, cat_cardinalities: list[int], d_out: int, model: dict, linear: dict,
                 w_model: float, w_linear: float, w_model_new: float | None = None, w_linear_new: float | None = None,
                 new_column: int | None = None) -> None:
        super().__init__()
        from hydra.utils import instantiate

        kw = dict(n_num=n_num, cat_cardinalities=cat_cardinalities, d_out=d_out)
        self.model = instantiate(model, **kw)
        self.linear = instantiate(linear, **kw)
        self.w_model, self.w_linear = float(w_model), float(w_linear)
        self.new_column = new_column
        self.w_model_new = self.w_model if w_model_new is None else float(w_model_new)
        self.w_linear_new = self.w_linear if w_linear_new is None else float(w_linear_new)

    def forward(self, x_num: Tensor, x_cat: Tensor | None) -> Tensor:
        out = self.model(x_num, x_cat)
        lin = self.linear(x_num, x_cat)
        if self.new_column is None:
            return self.w_model * out + self.w_linear * lin
        new = (x_num[:, self.new_column : self.new_column + 1] > 0).to(out.dtype)
        w_m = self.w_model + (self.w_model_new - self.w_model) * new
        w_l = self.w_linear + (self.w_linear_new - self.w_linear) * new
        return w_m * out + w_l * lin
