"""The loss zoo: every loss takes ``(pred, target, context)`` and returns a scalar.

``pred`` is the model output (batch, d_out) in scaled target units, ``target`` (batch,) the scaled
target, ``context`` a :class:`RowContext` with the unscaled per-row context (``aux``) and the affine map to
IV levels. Losses on target units (mse, mae, huber, ...) ignore ``context``; losses that need IV levels
(relative, log_iv, vega_weighted, surface) use ``context.level``. A plain torch loss
(``_target_: torch.nn.L1Loss``) still works: :func:`as_loss` wraps it.

Each loss documents when to use it. :class:`Loss` declares every hook the training loop, the evaluation and
the saved model ask a loss for, each with its default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vforge.data import features as feats
from vforge.data.iv import bs_vega as iv_bs_vega
from vforge.data.target import to_level

if TYPE_CHECKING:
    from vforge.data.dataset import Dataset

MIN_IV = 1e-4  # floor for predicted IV levels inside logs and divisions


@dataclass
class RowContext:
    """Per-row context of one batch, for the losses that need more than predictions and targets.

    ``aux`` holds unscaled (batch,) tensors: ``log_moneyness``, ``tau``, ``base`` (the IV a predicted
    change is added to), ``vega``, ``is_call``, ``quote_date_idx`` (whichever the data provides).
    ``rows`` (batch,) are the rows' indices in the training split (what a loss bound to the data looks up).
    ``probe(d_log_moneyness, d_tau)`` (optional) evaluates the model on the same rows with shifted
    contract terms and returns IV levels: given here, it takes the place of the surface loss's own probe.
    """

    aux: dict[str, Tensor] = field(default_factory=dict)
    y_center: float = 0.0
    y_scale: float = 1.0
    change: bool = False
    probe: Callable[[float, float], Tensor] | None = None
    rows: Tensor | None = None

    def level(self, scaled: Tensor) -> Tensor:
        """Scaled target units (batch,) -> IV levels (batch,)."""
        return to_level(scaled, y_center=self.y_center, y_scale=self.y_scale,
                        base=self.require("base") if self.change else None)

    def require(self, key: str) -> Tensor:
        try:
            return self.aux[key]
        except KeyError:
            raise KeyError(
                f"this loss needs the per-row value {key!r} (Split.aux); the data provides {sorted(self.aux)}"
            ) from None


class Loss(nn.Module):
    """Base class: subclasses implement ``forward(pred, target, context) -> scalar``.

    The hooks below are everything the loop (vforge/training/loop.py), the evaluation and the saved
    ``model.pt`` ask of a loss; override the ones that differ from the default.
    """

    d_out: int = 1  # model outputs the loss needs (one per quantile for loss=quantile)
    needs_levels: bool = False  # True: uses the per-row context (context.level, aux), which the loop then builds
    quantiles: list[float] | None = None  # the quantile each output predicts (saved with the model), or None

    @property
    def point_index(self) -> int:
        """The output column that is the point prediction (the median's for a quantile loss)."""
        return 0

    def point(self, pred: Tensor) -> Tensor:
        """The point prediction (batch,) from the model output (batch, d_out)."""
        return pred[:, self.point_index]

    def intervals(self) -> list[tuple[int, int, float]]:
        """Prediction intervals among the outputs, (i_lo, i_hi, nominal coverage); none by default."""
        return []

    def metrics(self) -> dict[str, float]:
        """Extra training metrics of the latest batch, logged each epoch as ``train/<name>_penalty``."""
        return {}

    def check_features(self, features: Sequence[str]) -> None:
        """Raise if the loss cannot work with ``data.features`` (run by ``validate`` before any data is built)."""

    def bind(self, model: nn.Module, data: Dataset) -> None:
        """Called once by the loop before training: a loss that probes ``model`` on ``data`` prepares it here."""

    def context(self, batch: RowContext | None) -> RowContext:
        """The batch's per-row context, which a loss with ``needs_levels`` cannot do without."""
        if batch is None:
            raise ValueError(f"{type(self).__name__} needs the batch's per-row context (levels, base); the loop passes "
                             "it when needs_levels is true")
        return batch


class MSE(Loss):
    """Mean squared error. The default: optimizes RMSE (the headline metric) directly."""

    def forward(self, pred: Tensor, target: Tensor, batch: RowContext | None = None) -> Tensor:
        return F.mse_loss(pred[:, 0], target)


class MAE(Loss):
    """Mean absolute error (L1). Estimates the conditional median: robust to bad quotes, optimizes MAE."""

    def forward(self, pred: Tensor, target: Tensor, batch: RowContext | None = None) -> Tensor:
        return F.l1_loss(pred[:, 0], target)


class Huber(Loss):
    """Quadratic for |e| <= delta, linear beyond (target units). MSE's efficiency, MAE's robustness to outliers."""

    def __init__(self, delta: float = 1.0) -> None:
        super().__init__()
        if delta <= 0:
            raise ValueError(f"delta must be > 0, got {delta=}")
        self.delta = delta

    def forward(self, pred: Tensor, target: Tensor, batch: RowContext | None = None) -> Tensor:
        return F.huber_loss(pred[:, 0], target, delta=self.delta)


class SmoothL1(Loss):
    """Huber divided by beta: 0.5 e^2 / beta for |e| < beta, |e| - beta/2 beyond. Gradient bounded by 1
    whatever beta is, so the learning rate need not change when beta does."""

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta=}")
        self.beta = beta

    def forward(self, pred: Tensor, target: Tensor, batch: RowContext | None = None) -> Tensor:
        return F.smooth_l1_loss(pred[:, 0], target, beta=self.beta)


class LogCosh(Loss):
    """log(cosh(e)): ~e^2/2 near zero, ~|e| - log 2 far away; a Huber that is smooth everywhere."""

    def forward(self, pred: Tensor, target: Tensor, batch: RowContext | None = None) -> Tensor:
        e = pred[:, 0] - target
        # log(cosh(e)) = |e| + log1p(exp(-2|e|)) - log 2, which does not overflow for large |e|
        a = e.abs()
        return (a + torch.log1p(torch.exp(-2 * a)) - math.log(2.0)).mean()


class Quantile(Loss):
    """Pinball loss at several quantiles at once, one model output each; the point prediction is the median.

    Use it for prediction intervals (e.g. 5%-95% around each IV); runs log the coverage of each
    symmetric pair of quantiles on val/test.
    """

    q: Tensor  # buffer (n_quantiles,)
    quantiles: list[float]

    def __init__(self, quantiles: Sequence[float] = (0.05, 0.5, 0.95)) -> None:
        super().__init__()
        qs = [float(q) for q in quantiles]
        if not qs or any(not 0 < q < 1 for q in qs) or sorted(set(qs)) != qs:
            raise ValueError(f"quantiles must be distinct, increasing and inside (0, 1), got {list(quantiles)}")
        if 0.5 not in qs:
            raise ValueError(f"quantiles must include 0.5 (the point prediction is the median), got {qs}")
        self.quantiles = qs
        self.d_out = len(qs)
        self.median = qs.index(0.5)
        self.register_buffer("q", torch.tensor(qs), persistent=False)

    @property
    def point_index(self) -> int:
        return self.median

    def intervals(self) -> list[tuple[int, int, float]]:
        """Symmetric pairs (i_lo, i_hi, nominal coverage), e.g. (0, 2, 0.9) for 0.05/0.95."""
        out = []
        for i, q in enumerate(self.quantiles):
            if q < 0.5:
                hi = [j for j, p in enumerate(self.quantiles) if abs(p - (1 - q)) < 1e-9]
                if hi:
                    out.append((i, hi[0], round(1 - 2 * q, 6)))
        return out

    def forward(self, pred: Tensor, target: Tensor, batch: RowContext | None = None) -> Tensor:
        if pred.shape[1] != self.d_out:
            raise ValueError(f"quantile loss with {self.d_out} quantiles needs d_out={self.d_out}, got {pred.shape[1]}")
        e = target[:, None] - pred  # (batch, n_quantiles); > 0 means under-prediction
        return torch.maximum(self.q * e, (self.q - 1) * e).mean()


class Wing(Loss):
    """Wing loss (Feng et al. 2018, https://arxiv.org/abs/1711.06753): w ln(1 + |e|/eps) for |e| < w, |e| - C
    beyond. Log-shaped near zero, so small and medium errors get more weight than under L1/L2; use it when
    the fit is good on average but not precise enough on the many small errors."""

    def __init__(self, width: float = 1.0, curvature: float = 0.5) -> None:
        super().__init__()
        if width <= 0 or curvature <= 0:
            raise ValueError(f"width and curvature must be > 0, got {width=}, {curvature=}")
        self.width, self.curvature = width, curvature
        self.c = width - width * math.log1p(width / curvature)  # makes the two pieces meet at |e| = width

    def forward(self, pred: Tensor, target: Tensor, batch: RowContext | None = None) -> Tensor:
        a = (pred[:, 0] - target).abs()
        small = self.width * torch.log1p(a / self.curvature)
        return torch.where(a < self.width, small, a - self.c).mean()


class Focal(Loss):
    """Focal regression loss (Yang et al. 2021, https://arxiv.org/abs/2102.09554): the base loss times
    tanh(beta |e|)^gamma, which down-weights rows already fit well; use it when rare regimes (wings,
    short expiries, vol spikes) are under-fit because easy rows dominate the mean."""

    def __init__(self, beta: float = 0.2, gamma: float = 1.0, base: str = "mse") -> None:
        super().__init__()
        if base not in ("mse", "l1"):
            raise ValueError(f"base must be 'mse' or 'l1', got {base=}")
        self.beta, self.gamma, self.base = beta, gamma, base

    def forward(self, pred: Tensor, target: Tensor, batch: RowContext | None = None) -> Tensor:
        e = pred[:, 0] - target
        rows = e**2 if self.base == "mse" else e.abs()
        return (rows * torch.tanh(self.beta * e.abs()) ** self.gamma).mean()


class Asymmetric(Loss):
    """|e|^power weighted by ``under`` where the model predicts below the target and ``over`` above it.

    Use it when the two errors cost differently: a market maker who sells options loses more by
    under-marking vol (under > over).
    """

    def __init__(self, under: float = 2.0, over: float = 1.0, power: float = 2.0) -> None:
        super().__init__()
        if under <= 0 or over <= 0 or power < 1:
            raise ValueError(f"under and over must be > 0 and power >= 1, got {under=}, {over=}, {power=}")
        self.under, self.over, self.power = under, over, power

    def forward(self, pred: Tensor, target: Tensor, batch: RowContext | None = None) -> Tensor:
        e = pred[:, 0] - target
        weight = torch.where(e < 0, self.under, self.over)
        return (weight * e.abs() ** self.power).mean()


class CVaR(Loss):
    """Conditional value at risk: the mean of the worst ``alpha`` share of per-row errors (squared or absolute).

    Use it to control the tail: the worst-quoted contracts, not the average one. Only those rows get gradient.
    """

    def __init__(self, alpha: float = 0.1, base: str = "mse") -> None:
        super().__init__()
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha=}")
        if base not in ("mse", "l1"):
            raise ValueError(f"base must be 'mse' or 'l1', got {base=}")
        self.alpha, self.base = alpha, base

    def forward(self, pred: Tensor, target: Tensor, batch: RowContext | None = None) -> Tensor:
        e = pred[:, 0] - target
        rows = e**2 if self.base == "mse" else e.abs()
        k = max(1, math.ceil(self.alpha * rows.numel()))
        return rows.topk(k).values.mean()


class Relative(Loss):
    """Squared relative error of IV levels, ((iv_pred - iv) / iv)^2: every contract counts in percent of
    its own vol, so low-vol (long-dated) contracts weigh as much as high-vol wings."""

    needs_levels = True

    def forward(self, pred: Tensor, target: Tensor, batch: RowContext | None = None) -> Tensor:
        batch = self.context(batch)
        iv = batch.level(target)
        return (((batch.level(pred[:, 0]) - iv) / iv.clamp_min(MIN_IV)) ** 2).mean()


class LogIV(Loss):
    """Squared error of log IV levels: multiplicative errors, and predicted IVs are kept positive in spirit
    (a prediction below ``MIN_IV`` is floored inside the log)."""

    needs_levels = True

    def forward(self, pred: Tensor, target: Tensor, batch: RowContext | None = None) -> Tensor:
        batch = self.context(batch)
        iv = batch.level(target)
        return ((torch.log(batch.level(pred[:, 0]).clamp_min(MIN_IV)) - torch.log(iv.clamp_min(MIN_IV))) ** 2).mean()


def bs_vega(log_moneyness: Tensor, tau: Tensor, iv: Tensor) -> Tensor:
    """Black-Scholes vega per unit of discounted forward, dC/dsigma / (F e^{-rT}) = sqrt(tau) phi(d1) with
    k = log(K/F) (``vforge.data.iv.bs_vega``, unit ``discounted_forward``), IV and tau floored to stay finite. A
    weight: no gradient flows through it."""
    k, t, s = (v.detach().cpu().double().numpy() for v in (log_moneyness, tau.clamp_min(1e-6), iv.clamp_min(MIN_IV)))
    vega = iv_bs_vega(1.0, np.exp(k), t, s, 0.0, unit="discounted_forward")
    return torch.as_tensor(vega, dtype=log_moneyness.dtype, device=log_moneyness.device)


class VegaWeighted(Loss):
    """Squared IV error weighted by Black-Scholes vega squared: (vega * (iv_pred - iv))^2 ~ (price error)^2.

    Use it when the model will price: an IV error on a deep out-of-the-money or very short option moves its
    price little. Normalized by the batch's mean vega^2, so the loss stays in IV^2 units. Uses ``aux["vega"]``
    (vega at the base IV); without it, vega per unit forward from ``log_moneyness``, ``tau`` and ``base``.
    """

    needs_levels = True

    def weights(self, batch: RowContext) -> Tensor:
        vega = batch.aux.get("vega")
        if vega is None:
            vega = bs_vega(batch.require("log_moneyness"), batch.require("tau"), batch.require("base"))
        w = vega**2
        return w / w.mean().clamp_min(1e-12)

    def forward(self, pred: Tensor, target: Tensor, batch: RowContext | None = None) -> Tensor:
        batch = self.context(batch)
        iv = batch.level(target)
        return (self.weights(batch) * (batch.level(pred[:, 0]) - iv) ** 2).mean()


def arbitrage_penalties(w: Tensor, w_up: Tensor, w_down: Tensor, w_later: Tensor, k: Tensor, dk: float,
                        dtau: float) -> tuple[Tensor, Tensor]:
    """Calendar and butterfly violations of a total-variance surface w(k, tau) = iv^2 tau, by finite differences.

    Args:
        w, w_up, w_down, w_later: total variance at (k, tau), (k + dk, tau), (k - dk, tau), (k, tau + dtau).
        k: log-moneyness log(K/F).

    Calendar: w must not decrease in tau at fixed k; the penalty is mean(relu(-dw/dtau)).
    Butterfly: Durrleman's condition (Gatheral & Jacquier 2014, https://arxiv.org/abs/1204.0646)
    g(k) = (1 - k w'/(2w))^2 - w'^2/4 (1/w + 1/4) + w''/2 >= 0; the penalty is mean(relu(-g)).
    """
    calendar = F.relu(-(w_later - w) / dtau).mean()
    w1 = (w_up - w_down) / (2 * dk)
    w2 = (w_up - 2 * w + w_down) / dk**2
    wp = w.clamp_min(1e-8)
    g = (1 - k * w1 / (2 * wp)) ** 2 - w1**2 / 4 * (1 / wp + 0.25) + w2 / 2
    return calendar, F.relu(-g).mean()


class Surface(Loss):
    """A base loss (mse) plus penalties for calendar and butterfly arbitrage on the predicted surface.

    The model is probed around each of up to ``n_probe`` rows of the batch at log-moneyness ``k + dk``, ``k - dk``
    and at ``tau + dtau`` years, with every feature that is computed from the contract's terms recomputed there
    (``vforge.data.features.at_terms``: delta, moneyness_std, the smile features, ...; the contract's history
    held fixed), in eval mode so dropout does not swamp the finite differences. Use it when the surface will be
    used to price or to compute greeks, where arbitrage gives negative densities; see :func:`arbitrage_penalties`.
    """

    needs_levels = True

    def __init__(self, calendar_weight: float = 1.0, butterfly_weight: float = 1.0, dk: float = 0.02,
                 dtau: float = 0.02, n_probe: int = 128, base: Loss | None = None) -> None:
        super().__init__()
        if dk <= 0 or dtau <= 0 or n_probe < 1:
            raise ValueError(f"dk, dtau must be > 0 and n_probe >= 1, got {dk=}, {dtau=}, {n_probe=}")
        self.calendar_weight, self.butterfly_weight = calendar_weight, butterfly_weight
        self.dk, self.dtau, self.n_probe = dk, dtau, n_probe
        self.base = base if base is not None else MSE()
        self.last: dict[str, Tensor] = {}  # the latest batch's penalties
        # (model, training inputs (n, n_num), the same at k + dk, k - dk, tau + dtau (3, n, n_num), x_cat): bind()
        self._probe_inputs: tuple[nn.Module, Tensor, Tensor, Tensor | None] | None = None

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.last.items()}

    def check_features(self, features: Sequence[str]) -> None:
        if "log_moneyness" not in features or not {"tau", "sqrt_tau"} & set(features):
            raise ValueError(f"loss=surface probes the model in log_moneyness and tau, so data.features must include "
                             f"log_moneyness and tau (or sqrt_tau); got {list(features)}")

    def bind(self, model: nn.Module, data: Dataset) -> None:
        """Compute once the training rows' inputs at the probe's shifted terms, scaled as the dataset scales."""
        self.check_features(data.feature_names)
        train, device = data.train, next(model.parameters()).device
        rows = train.rows
        k, tau = rows["log_moneyness"].to_numpy(np.float64), rows["tau"].to_numpy(np.float64)
        contracts = pd.DataFrame({"prev_iv": train.base,  # the base is the contract's previous IV (prev_iv)
                                  "is_call": (rows["option_type"] == "C").to_numpy(np.float64),
                                  "rate": rows["rate"], "dividend_yield": rows["dividend_yield"],
                                  "info_idx": rows["info_idx"]})
        x = train.x_num.double().numpy()
        at = lambda kk, tt: feats.at_terms(x, data.feature_names, data.x_mean, data.x_std, contracts,  # noqa: E731
                                           data.quotes, kk, tt)
        shifted = np.stack([at(k + self.dk, tau), at(k - self.dk, tau), at(k, tau + self.dtau)])
        x_cat = None if train.x_cat is None else train.x_cat.to(device)
        self._probe_inputs = (model, train.x_num.to(device), torch.as_tensor(shifted, dtype=torch.float32,
                                                                              device=device), x_cat)

    def probe(self, batch: RowContext) -> Tensor:
        """IV levels (4n,) of the batch's first n <= ``n_probe`` rows at (k, tau), (k + dk, tau), (k - dk, tau),
        (k, tau + dtau), from one eval-mode forward pass (a probe given with the context instead, if any)."""
        if batch.probe is not None:
            return batch.probe(self.dk, self.dtau)
        if self._probe_inputs is None or batch.rows is None:
            raise ValueError("the surface loss needs a surface probe: the loop binds it to the model and the data "
                             "(log_moneyness and tau among data.features)")
        model, x_num, shifted, x_cat = self._probe_inputs
        rows = batch.rows[: self.n_probe]
        n = len(rows)
        x = torch.cat([x_num[rows], shifted[:, rows].reshape(3 * n, -1)])  # (4n, n_num): center, k+dk, k-dk, tau+dtau
        was_training = model.training
        model.eval()  # dropout noise would swamp the finite differences
        try:
            out = model(x, None if x_cat is None else x_cat[rows].repeat(4, 1))[:, 0].float()
        finally:
            model.train(was_training)
        sub = RowContext({k: v[:n].repeat(4) for k, v in batch.aux.items()}, batch.y_center, batch.y_scale,
                         batch.change)
        return sub.level(out)

    def penalties(self, batch: RowContext) -> tuple[Tensor, Tensor]:
        # one forward for all probe points: (4 * n,) IV levels, then split
        iv, up, down, later = self.probe(batch).chunk(4)
        k = batch.require("log_moneyness")[: len(iv)]
        tau = batch.require("tau")[: len(iv)]
        w = lambda s, t: s.clamp_min(0) ** 2 * t  # noqa: E731
        return arbitrage_penalties(w(iv, tau), w(up, tau), w(down, tau), w(later, tau + self.dtau), k, self.dk,
                                   self.dtau)

    def forward(self, pred: Tensor, target: Tensor, batch: RowContext | None = None) -> Tensor:
        batch = self.context(batch)
        loss = self.base(pred, target, batch)
        calendar, butterfly = self.penalties(batch)
        self.last = {"calendar": calendar.detach(), "butterfly": butterfly.detach()}  # logged by the loop
        return loss + self.calendar_weight * calendar + self.butterfly_weight * butterfly


class TorchLoss(Loss):
    """Adapter for a plain torch loss ``fn(pred (batch,), target (batch,))``."""

    def __init__(self, fn: nn.Module | Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, pred: Tensor, target: Tensor, batch: RowContext | None = None) -> Tensor:
        return self.fn(pred[:, 0], target)


def as_loss(obj: Loss | nn.Module | Callable) -> Loss:
    """A vforge :class:`Loss` as is; a torch loss (``torch.nn.MSELoss()``) wrapped in :class:`TorchLoss`."""
    return obj if isinstance(obj, Loss) else TorchLoss(obj)
