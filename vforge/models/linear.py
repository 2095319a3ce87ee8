"""Ridge regression on the features and their pairwise products, fit in closed form; the reference to beat.

On thin or regime-changing real chains a ridge on the change over persistence, with spot-return x moneyness and
spot-return / sqrt(tau) interactions, was the only model of those tried to beat persistence out of sample (issue 10).
Here every pairwise product of the (scaled) inputs is a column, which holds those interactions whatever the feature
set, and the penalty is chosen on walk-forward folds inside the training dates (``fit_closed_form``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vforge.data.dataset import inner_folds
from vforge.evaluation.metrics import capped_ratio, per_date_ratio, robust_score
from vforge.models.base import Model


class Ridge(Model):
    """``y = w . z(x)`` with ``z`` the inputs, their pairwise products, one-hot categories and a constant, each column
    scaled to unit RMS on the training rows. Each input is first clipped to the ``clip`` / ``1 - clip`` quantiles of
    the rows it was fit on: a product of two inputs far outside their training range (a torn quote's residual, a
    gap twice the longest seen) would otherwise extrapolate quadratically, tens of vol points on one row.

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
        clip: quantile of the fit rows each input is clipped to at either end (None: not clipped).
        split_by: the name of an input (``prev_iv_missing``) whose positive rows get their own ridge: every column
            twice, once on the rows where it is 0 and once where it is positive, so contracts new on the date (a
            change over the previous surface, errors ten times larger) do not bend the fit of the previously quoted
            rows (a change over persistence). Scaled to unit RMS on all rows, the two halves solve exactly as two
            ridges scaled on their own rows with the same penalty would. Its index among the inputs is set by
            ``prepare`` (from the run's feature names; before it the ridge refuses to be fit, and predicts all rows
            with the first half) and saved with the weights; where the run has no such input, all rows are in the
            first half. None (the default of a config saved before it existed): one ridge for all rows.
    """

    closed_form = True
    pairs: Tensor  # buffers
    split_index: Tensor
    scale: Tensor
    lo: Tensor
    hi: Tensor

    def __init__(self, *, n_num: int, cat_cardinalities: list[int], d_out: int, interactions: bool = True,
                 alphas: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0), n_folds: int = 4,
                 fold_fraction: float = 0.5, trim: float = 0.2, tolerance: float = 0.01,
                 cap: float | None = None, clip: float | None = 0.001, split_by: str | None = None) -> None:
        super().__init__()
        if not alphas or any(a <= 0 for a in alphas):
            raise ValueError(f"alphas must be a non-empty list of positive penalties, got {list(alphas)}")
        if n_folds < 1 or not 0 < fold_fraction < 1:
            raise ValueError(f"need n_folds >= 1 and 0 < fold_fraction < 1, got {n_folds=}, {fold_fraction=}")
        self.n_num, self.cat_cardinalities, self.interactions = n_num, list(cat_cardinalities), interactions
        self.alphas, self.n_folds, self.fold_fraction = sorted(float(a) for a in alphas), n_folds, fold_fraction
        if clip is not None and not 0 <= clip < 0.5:
            raise ValueError(f"clip must be a quantile in [0, 0.5) or null, got {clip}")
        self.trim, self.tolerance, self.cap, self.clip = trim, tolerance, cap, clip
        self.split_by = split_by
        if split_by is not None:
            self.register_buffer("split_index", torch.tensor(-2))  # set by ``prepare``: -1 no such input, -2 not yet
        pairs = torch.triu_indices(n_num, n_num) if interactions else torch.empty(2, 0, dtype=torch.long)
        self.register_buffer("pairs", pairs, persistent=False)
        d_in = (1 + n_num + pairs.shape[1] + sum(cat_cardinalities)) * (1 if split_by is None else 2)
        self.register_buffer("scale", torch.ones(d_in))
        self.register_buffer("lo", torch.full((n_num,), -math.inf))  # the inputs' clip bounds (the fit rows')
        self.register_buffer("hi", torch.full((n_num,), math.inf))
        # A plain parameter, not an nn.Linear: int8 dynamic quantization (export) leaves it alone; products of inputs
        # span too wide a range for one int8 scale.
        self.weight = nn.Parameter(torch.zeros(d_out, d_in))
        nn.init.normal_(self.weight, std=d_in**-0.5)
        self.selection: dict = {}

    def prepare(self, data: Any) -> dict[str, Any] | None:
        """``split_by``'s index among ``data``'s numerical inputs (``data.feature_names``), kept in the state dict."""
        if self.split_by is not None:
            names = list(data.feature_names)
            self.split_index.fill_(names.index(self.split_by) if self.split_by in names else -1)
        return None

    def _check_prepared(self) -> None:
        if self.split_by is not None and int(self.split_index) == -2:
            raise ValueError(f"Ridge(split_by={self.split_by!r}) is fit before prepare(data) told it which input that "
                             "is (train() and the do-no-harm step call it; so must any other caller)")

    def bounds(self, x_num: Tensor) -> tuple[Tensor, Tensor]:
        """The clip bounds a fit on these rows uses: each input's ``clip`` and ``1 - clip`` quantiles (none: infinite)."""
        if self.clip is None or not len(x_num):
            return torch.full((self.n_num,), -math.inf), torch.full((self.n_num,), math.inf)
        q = np.quantile(x_num.double().numpy(), [self.clip, 1 - self.clip], axis=0)
        return torch.as_tensor(q[0]), torch.as_tensor(q[1])

    def expand(self, x_num: Tensor, x_cat: Tensor | None, bounds: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(batch, n_num), (batch, n_cat) -> (batch, d_in) unscaled columns, the inputs clipped to ``bounds`` (by
        default the fitted ones)."""
        lo, hi = (self.lo, self.hi) if bounds is None else bounds
        new = self.second_half(x_num)  # read before clipping (a rare positive value may lie above the fit's quantile)
        x_num = torch.maximum(torch.minimum(x_num, hi.to(x_num.dtype)), lo.to(x_num.dtype))
        cols = [torch.ones_like(x_num[:, :1]), x_num, x_num[:, self.pairs[0]] * x_num[:, self.pairs[1]]]
        if x_cat is not None and self.cat_cardinalities:
            cols += [nn.functional.one_hot(x_cat[:, i].clamp(0, c - 1), c).to(x_num.dtype)
                     for i, c in enumerate(self.cat_cardinalities)]
        z = torch.cat(cols, dim=1)
        if new is None:
            return z
        new = new[:, None].to(z.dtype)
        return torch.cat([z * (1 - new), z * new], dim=1)

    def second_half(self, x_num: Tensor) -> Tensor | None:
        """Which rows ``split_by`` puts in the second half (bool, (batch,)); None without ``split_by``."""
        if self.split_by is None:
            return None
        i = int(self.split_index)
        return x_num[:, i] > 0 if i >= 0 else torch.zeros(len(x_num), dtype=torch.bool, device=x_num.device)

    def penalty(self, alpha: float | Sequence[float]) -> np.ndarray:
        """One penalty per column: ``alpha`` for all, or with ``split_by`` a pair, the first half's and the
        second's (inf: that half predicts no change)."""
        pair = [float(a) for a in alpha] if isinstance(alpha, Sequence) else [float(alpha)] * 2
        if len(pair) != 2 or (self.split_by is None and pair[0] != pair[1]):
            raise ValueError(f"a penalty per half needs split_by and two penalties, got {alpha!r}")
        half = len(self.scale) // 2 if self.split_by is not None else len(self.scale)
        return np.repeat(pair, [half, len(self.scale) - half])

    def forward(self, x_num: Tensor, x_cat: Tensor | None) -> Tensor:
        return (self.expand(x_num, x_cat) / self.scale) @ self.weight.T

    def _columns(self, x_num: Tensor, x_cat: Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        """The expanded columns of these rows (their inputs clipped to their own bounds, which the model keeps)
        scaled to unit RMS on them, and that scale."""
        self._check_prepared()
        lo, hi = self.bounds(x_num)
        self.lo.copy_(lo), self.hi.copy_(hi)
        z = self.expand(x_num.double(), x_cat).numpy()
        scale = np.sqrt(np.mean(z**2, axis=0))
        scale = np.where(scale > 0, scale, 1.0)
        return z / scale, scale

    @torch.no_grad()
    def fold_path(self, x_num: Tensor, x_cat: Tensor | None, y: Tensor, dates: np.ndarray, blocks: list[np.ndarray],
                  alphas: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """Out-of-sample predictions on expanding walk-forward ``blocks`` (sorted, disjoint arrays of ``dates``): each
        block predicted by the fits on every row dated before it, one per penalty of ``alphas`` (inf: 0,
        persistence), with the inputs clipped to those fit rows' bounds and the columns scaled to unit RMS on them,
        as a fit on them alone (``fit_closed_form``) does. Returns (mask of the rows predicted, predictions
        (n, len(alphas))); the model itself is left unchanged."""
        self._check_prepared()
        dates = np.asarray(dates)
        x, yn = x_num.double(), y.double().numpy().reshape(len(y), -1)[:, :1]
        out, mask = np.zeros((len(y), len(alphas))), np.zeros(len(y), bool)
        pick = lambda r: None if x_cat is None else x_cat[r]  # noqa: E731
        for block in blocks:
            fit, rows = np.flatnonzero(dates < block[0]), np.flatnonzero(np.isin(dates, block))
            if not len(fit) or not len(rows):
                continue
            bounds = self.bounds(x[fit])
            z = self.expand(x[fit], pick(fit), bounds).numpy()
            scale = np.sqrt(np.mean(z**2, axis=0))
            scale = np.where(scale > 0, scale, 1.0)
            g, r = _normal(z / scale, yn[fit])
            ze = self.expand(x[rows], pick(rows), bounds).numpy() / scale
            out[rows] = np.column_stack([(ze @ _solve(g, r, a))[:, 0] for a in alphas])
            mask[rows] = True
        return mask, out

    @torch.no_grad()
    def fit_closed_form(self, x_num: Tensor, x_cat: Tensor | None, y: Tensor, dates: np.ndarray,
                        alpha: float | Sequence[float] | None = None) -> dict:
        """Choose the penalty on walk-forward folds over ``dates`` (one per row), refit on all rows; returns (and keeps
        in ``self.selection``) what was chosen and why. With ``split_by`` each half chooses its own on its own rows
        (``alpha_new``: the second half's; the halves are independent ridges). With ``alpha`` (inf: persistence;
        with ``split_by`` also a pair, see ``penalty``), that penalty, chosen elsewhere (the do-no-harm step chooses
        it on its own folds), without folds."""
        z, scale = self._columns(x_num, x_cat)
        yn = y.double().numpy().reshape(len(y), -1)
        if alpha is not None:
            penalty = self.penalty(alpha)
            self._set(z, yn, scale, penalty)
            self.selection = {"alpha": float(penalty[0]), "alpha_new": float(penalty[-1]),
                              "why": "penalty given (chosen outside this fit)"}
            return self.selection
        dates = np.asarray(dates)
        blocks = inner_folds(dates, self.n_folds, self.fold_fraction)
        candidates = [*self.alphas, math.inf]
        evaluated, oos = self.fold_path(x_num, x_cat, y, dates, blocks, candidates)
        second = self.second_half(x_num)
        halves = [np.ones(len(y), bool)] if second is None or not second.any() else [~second.numpy(),
                                                                                      second.numpy()]
        chosen: list[float] = []
        why: list[str] = []
        scores: list[dict[str, float]] = []
        for on in halves:
            f = evaluated & on
            score = {a: self._score(oos[f, j], yn[f, 0], dates[f]) if f.any() else math.nan
                     for j, a in enumerate(candidates)}
            finite = {a: v for a, v in score.items() if np.isfinite(v)}
            if finite:
                best = min(finite.values())
                chosen.append(max(a for a, v in finite.items() if v <= best + self.tolerance))
                why.append("no penalty beat predicting no change on the folds: persistence" if math.isinf(chosen[-1])
                           else f"largest penalty within {self.tolerance:g} of the best "
                           f"{'capped pooled' if self.cap is not None else 'robust'} score")
            else:  # too few dates for a fold: the smallest penalty the grid allows is no evidence; the largest
                chosen.append(self.alphas[-1])
                why.append("too few training dates for walk-forward folds: the largest penalty")
            scores.append({str(a): round(v, 4) for a, v in score.items()})
        self._set(z, yn, scale, self.penalty(chosen[0] if len(chosen) == 1 else chosen))
        self.selection = {"alpha": chosen[0], "alpha_new": chosen[-1], "scores": scores[0],  # the first half's
                          "fold_dates": int(sum(len(b) for b in blocks)), "why": why[0] if len(why) == 1 else
                          f"{why[0]}; second half ({self.split_by}): penalty {chosen[1]:g}, {why[1]}"}
        return self.selection

    def _set(self, z: np.ndarray, yn: np.ndarray, scale: np.ndarray, penalty: np.ndarray) -> None:
        w = _solve(*_normal(z, yn), penalty)
        self.scale.copy_(torch.as_tensor(scale, dtype=self.scale.dtype))
        self.weight.copy_(torch.as_tensor(w.T, dtype=self.weight.dtype))

    def _score(self, pred: np.ndarray, true: np.ndarray, day: np.ndarray) -> float:
        """Score of one penalty's fold predictions (lower is better; 1 is persistence): with ``cap``, the pooled MSE
        ratio with each date's weight capped (``capped_ratio``, the do-no-harm step's score), else the trimmed
        mean of per-date ratios."""
        if self.cap is not None:
            return capped_ratio(pred, true, day, self.cap)
        return robust_score(per_date_ratio(pred, true, day), self.trim)


def _normal(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return z.T @ z / len(z), z.T @ y / len(z)


def _solve(gram: np.ndarray, rhs: np.ndarray, alpha: float | np.ndarray) -> np.ndarray:
    """The ridge weights for a penalty, or one per column (an infinite one: that column's weight 0, the others
    solved without it; block-diagonal ``gram``, as of ``split_by``'s halves, solves each block exactly alone)."""
    penalty = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (len(gram),))
    keep = np.isfinite(penalty)
    w = np.zeros((len(gram), rhs.shape[1]))
    if keep.any():
        w[keep] = np.linalg.solve(gram[np.ix_(keep, keep)] + np.diag(penalty[keep]), rhs[keep])
    return w


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
