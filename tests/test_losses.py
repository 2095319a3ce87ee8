"""Every loss against a hand computation, and its gradient where it is not smooth."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from scipy.stats import norm

from tests.conftest import CONF_DIR
from vforge.config import validate
from vforge.training import losses as L

LOSS_OPTIONS = sorted(p.stem for p in (Path(CONF_DIR) / "loss").glob("*.yaml"))


def col(*v: float) -> torch.Tensor:
    """Predictions (n, 1) that require grad."""
    return torch.tensor(v, dtype=torch.float64)[:, None].requires_grad_()


def t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def grad_of(loss: L.Loss, pred: torch.Tensor, target: torch.Tensor, batch: L.RowContext | None = None) -> torch.Tensor:
    loss(pred, target, batch).backward()
    return pred.grad[:, 0]


def test_there_are_at_least_14_losses():
    assert len(LOSS_OPTIONS) >= 14, LOSS_OPTIONS


@pytest.mark.parametrize("option", LOSS_OPTIONS)
def test_every_configured_loss_gives_a_finite_scalar_and_gradient(make_cfg, option):
    loss = L.as_loss(instantiate(make_cfg(f"loss={option}").loss, _convert_="all"))
    pred = torch.randn(64, loss.d_out, requires_grad=True)
    target = torch.randn(64)
    k, tau = torch.linspace(-0.3, 0.3, 64), torch.linspace(0.05, 1.0, 64)
    batch = L.RowContext({"log_moneyness": k, "tau": tau, "base": torch.full((64,), 0.2)}, 0.0, 0.01, change=True,
                    probe=lambda dk, dtau: torch.full((256,), 0.2) + 0 * pred.sum())
    value = loss(pred, target, batch)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(pred.grad).all()
    assert loss.point(pred).shape == (64,)


def test_mse_mae():
    assert L.MSE()(col(1, 2), t(0, 0)).item() == pytest.approx(2.5)
    assert L.MAE()(col(1, -2), t(0, 0)).item() == pytest.approx(1.5)
    # |e| has a kink at 0: torch's subgradient there is 0, elsewhere sign(e) / n
    assert grad_of(L.MAE(), col(0, 1, -1), t(0, 0, 0)).tolist() == pytest.approx([0, 1 / 3, -1 / 3])


def test_huber_and_smooth_l1():
    assert L.Huber(delta=1.0)(col(0.5, 3), t(0, 0)).item() == pytest.approx((0.5 * 0.25 + (3 - 0.5)) / 2)
    # gradient is continuous at |e| = delta: e there, delta beyond
    assert grad_of(L.Huber(delta=1.0), col(1.0, 0.5, -4), t(0, 0, 0)).tolist() == pytest.approx([1 / 3, 0.5 / 3, -1 / 3])
    assert L.SmoothL1(beta=2.0)(col(1, 4), t(0, 0)).item() == pytest.approx((0.5 * 1 / 2 + (4 - 1)) / 2)
    assert grad_of(L.SmoothL1(beta=2.0), col(1, 4), t(0, 0)).tolist() == pytest.approx([0.5 / 2, 1 / 2])
    with pytest.raises(ValueError, match="delta must be > 0"):
        L.Huber(delta=0)


def test_log_cosh_matches_closed_form_and_does_not_overflow():
    got = L.LogCosh()(col(0, 1, 30), t(0, 0, 0)).item()
    assert got == pytest.approx((0 + math.log(math.cosh(1)) + math.log(math.cosh(30))) / 3, rel=1e-12)
    big = L.LogCosh()(col(1000.0), t(0.0))
    assert big.item() == pytest.approx(1000 - math.log(2))
    assert grad_of(L.LogCosh(), col(1.0), t(0.0)).item() == pytest.approx(math.tanh(1.0))


def test_quantile_pinball_values_gradients_and_intervals():
    loss = L.Quantile([0.1, 0.5, 0.9])
    pred = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    # target above the prediction: q * e; below: (q - 1) * e
    assert loss(pred, t(1, -1)).item() == pytest.approx(((0.1 + 0.5 + 0.9) + (0.9 + 0.5 + 0.1)) / 6)
    loss(pred, t(1, -1)).backward()
    assert pred.grad[0].tolist() == pytest.approx([-0.1 / 6, -0.5 / 6, -0.9 / 6])
    assert pred.grad[1].tolist() == pytest.approx([0.9 / 6, 0.5 / 6, 0.1 / 6])
    assert loss.d_out == 3 and loss.point(torch.tensor([[1.0, 2.0, 3.0]])).item() == 2.0
    assert L.Quantile([0.05, 0.25, 0.5, 0.75, 0.95]).intervals() == [(0, 4, 0.9), (1, 3, 0.5)]


def test_quantile_rejects_bad_configs():
    with pytest.raises(ValueError, match="must include 0.5"):
        L.Quantile([0.1, 0.9])
    with pytest.raises(ValueError, match="increasing"):
        L.Quantile([0.9, 0.5, 0.1])
    with pytest.raises(ValueError, match="needs d_out=3, got 1"):
        L.Quantile([0.1, 0.5, 0.9])(torch.zeros(4, 1), torch.zeros(4))


def test_quantile_with_mismatched_model_d_out_fails_before_training(make_cfg):
    with pytest.raises(ValueError, match=r"model.d_out=1 does not match the loss: Quantile needs d_out=5"):
        validate(make_cfg("loss=quantile", "+model.d_out=1"))


def test_wing_pieces_meet_and_gradient_kinks_at_width():
    loss = L.Wing(width=1.0, curvature=0.5)
    assert loss(col(0.5), t(0.0)).item() == pytest.approx(math.log(2.0))
    assert loss(col(3.0), t(0.0)).item() == pytest.approx(3 - (1 - math.log(3.0)))
    below, above = loss(col(1 - 1e-9), t(0.0)).item(), loss(col(1 + 1e-9), t(0.0)).item()
    assert below == pytest.approx(above, abs=1e-8)  # continuous at |e| = width
    # slope w / (eps + |e|) = 1 / 1.5 just below the width, 1 beyond it
    assert grad_of(loss, col(0.999999), t(0.0)).item() == pytest.approx(1 / 1.5, rel=1e-5)
    assert grad_of(loss, col(1.000001), t(0.0)).item() == pytest.approx(1.0)


def test_focal_weights_the_base_loss():
    assert L.Focal(beta=0.2, gamma=1.0)(col(2.0), t(0.0)).item() == pytest.approx(4 * math.tanh(0.4))
    assert L.Focal(beta=0.5, gamma=2.0, base="l1")(col(-2.0), t(0.0)).item() == pytest.approx(2 * math.tanh(1.0) ** 2)


def test_asymmetric_penalizes_under_prediction_more():
    loss = L.Asymmetric(under=2.0, over=1.0, power=2.0)
    assert loss(col(0, 2), t(1, 1)).item() == pytest.approx((2 * 1 + 1 * 1) / 2)
    assert grad_of(loss, col(0, 2), t(1, 1)).tolist() == pytest.approx([2 * 2 * -1 / 2, 2 * 1 / 2])
    linear = L.Asymmetric(under=3.0, over=1.0, power=1.0)
    assert grad_of(linear, col(-1, 1), t(0, 0)).tolist() == pytest.approx([-3 / 2, 1 / 2])


def test_cvar_is_the_mean_of_the_worst_alpha_share():
    loss = L.CVaR(alpha=0.5)
    assert loss(col(1, 2, 3, 4), t(0, 0, 0, 0)).item() == pytest.approx((16 + 9) / 2)
    # only the worst rows carry gradient
    assert grad_of(loss, col(1, 2, 3, 4), t(0, 0, 0, 0)).tolist() == pytest.approx([0, 0, 3, 4])
    assert L.CVaR(alpha=0.1, base="l1")(col(1, -5, 2), t(0, 0, 0)).item() == pytest.approx(5.0)  # ceil(0.3) = 1


def level_batch(change: bool = False, **aux) -> L.RowContext:
    """Scaled target u -> IV 0.1 u + 0.2 (+ base)."""
    return L.RowContext({k: t(*v) for k, v in aux.items()}, y_center=0.2, y_scale=0.1, change=change)


def test_relative_and_log_iv_work_on_levels():
    b = level_batch()
    # pred 1 -> IV 0.3, target 0 -> IV 0.2
    assert L.Relative()(col(1.0), t(0.0), b).item() == pytest.approx((0.1 / 0.2) ** 2)
    assert L.LogIV()(col(1.0), t(0.0), b).item() == pytest.approx(math.log(0.3 / 0.2) ** 2)
    # change target: levels are base + 0.1 u + 0.2
    bc = level_batch(change=True, base=[0.1])
    assert L.Relative()(col(1.0), t(0.0), bc).item() == pytest.approx((0.1 / 0.3) ** 2)
    with pytest.raises(KeyError, match="needs the per-row value 'base'"):
        L.Relative()(col(1.0), t(0.0), level_batch(change=True))


def test_bs_vega_matches_a_finite_difference_of_black_price():
    k, tau, iv = 0.1, 0.5, 0.25

    def call(sigma: float) -> float:  # Black call per unit of discounted forward, strike K = F e^k
        sd = sigma * math.sqrt(tau)
        d1 = -k / sd + sd / 2
        return norm.cdf(d1) - math.exp(k) * norm.cdf(d1 - sd)

    fd = (call(iv + 1e-6) - call(iv - 1e-6)) / 2e-6
    assert L.bs_vega(t(k), t(tau), t(iv)).item() == pytest.approx(fd, rel=1e-6)


def test_vega_weighted_uses_normalized_vega_squared():
    b = level_batch(vega=[1.0, 3.0])
    # IV errors 0.1 and 0.1; weights v^2 / mean(v^2) = 1/5, 9/5
    got = L.VegaWeighted()(col(1, 1), t(0, 0), b).item()
    assert got == pytest.approx((0.2 * 0.01 + 1.8 * 0.01) / 2)
    derived = level_batch(change=True, log_moneyness=[0.0, 0.3], tau=[0.5, 0.1], base=[0.2, 0.2])
    w = L.bs_vega(t(0.0, 0.3), t(0.5, 0.1), t(0.2, 0.2)) ** 2
    assert L.VegaWeighted().weights(derived).tolist() == pytest.approx((w / w.mean()).tolist())


def test_arbitrage_penalties_on_hand_made_surfaces():
    k, dk, dtau = t(0.1), 0.01, 0.02
    flat = lambda tau: t(0.04 * tau)  # noqa: E731  total variance of a flat 20% vol
    cal, fly = L.arbitrage_penalties(flat(0.5), flat(0.5), flat(0.5), flat(0.52), k, dk, dtau)
    assert cal.item() == 0 and fly.item() == 0
    # total variance falling with expiry: penalty is the slope -dw/dtau
    cal, _ = L.arbitrage_penalties(t(0.02), t(0.02), t(0.02), t(0.018), k, dk, dtau)
    assert cal.item() == pytest.approx(0.002 / dtau)
    # w(k) = 0.04 + k (slope 1) at k = 0.1: g = (1 - 0.1/(2*0.14))^2 - 1/4 (1/0.14 + 1/4) < 0
    w = lambda kk: t(0.04 + kk)  # noqa: E731
    _, fly = L.arbitrage_penalties(w(0.1), w(0.1 + dk), w(0.1 - dk), w(0.1), k, dk, dtau)
    g = (1 - 0.1 / 0.28) ** 2 - 0.25 * (1 / 0.14 + 0.25)
    assert fly.item() == pytest.approx(-g, rel=1e-9)


def test_surface_loss_adds_weighted_penalties_from_the_probe():
    b = level_batch(log_moneyness=[0.0], tau=[0.5])
    # probe: center, k+dk, k-dk, tau+dtau; IV falls with tau so total variance falls
    b.probe = lambda dk, dtau: t(0.2, 0.2, 0.2, 0.1)
    loss = L.Surface(calendar_weight=2.0, butterfly_weight=0.0, dtau=0.5)
    calendar = (0.04 * 0.5 - 0.01 * 1.0) / 0.5
    assert loss(col(0.0), t(0.0), b).item() == pytest.approx(2.0 * calendar)
    with pytest.raises(ValueError, match="needs a surface probe"):
        L.Surface()(col(0.0), t(0.0), level_batch(log_moneyness=[0.0], tau=[0.5]))


def test_surface_loss_needs_moneyness_and_tau_features(make_cfg):
    with pytest.raises(ValueError, match="data.features must include log_moneyness and tau"):
        validate(make_cfg("loss=surface", "data.features=[prev_iv,gap_days]"))


def test_plain_torch_losses_are_wrapped():
    loss = L.as_loss(torch.nn.L1Loss())
    assert isinstance(loss, L.TorchLoss) and loss(col(1, -3), t(0, 0)).item() == pytest.approx(2.0)


class SmileInMoneynessStd(torch.nn.Module):
    """IV level = 0.1 + 0.2 exp(-m^2), m = moneyness_std = k / (prev_iv sqrt(tau)): a known function of strike and
    tenor that reaches them only through the moneyness_std column (a bump: concave at the money, where Durrleman's
    condition fails)."""

    def __init__(self, data) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # fit() asks for a device and an optimizer
        self.j = data.feature_names.index("moneyness_std")
        self.mean, self.std = float(data.x_mean[self.j]), float(data.x_std[self.j])
        self.center, self.scale = data.y_center, data.y_scale

    @staticmethod
    def iv(m):
        return 0.1 + 0.2 * torch.exp(-(m**2))

    def forward(self, x_num, x_cat=None):
        m = x_num[:, self.j].double() * self.std + self.mean
        return ((self.iv(m) - self.center) / self.scale + 0 * self.unused)[:, None]


def test_surface_penalties_follow_strike_through_every_feature_computed_from_it(make_cfg):
    """The probe moves strike and tenor, not only the log_moneyness column: penalties of a surface the model sees
    through moneyness_std alone match Durrleman's condition on the closed form (held fixed, they would be 0)."""
    from vforge.training.loop import fit

    data = instantiate(make_cfg("data.features=[log_moneyness,tau,moneyness_std]", "data.target=level").data,
                       _convert_="all")
    model = SmileInMoneynessStd(data)
    n, dk, dtau = len(data.train), 0.02, 0.02
    loss = L.Surface(dk=dk, dtau=dtau, n_probe=n)  # every training row is probed: one batch of all of them
    result = fit(model, data, loss_fn=loss, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), max_epochs=1,
                 batch_size=n, generator=torch.Generator().manual_seed(0))
    k, tau = (torch.tensor(data.train.rows[c].to_numpy()) for c in ("log_moneyness", "tau"))
    prev_iv = torch.tensor(data.train.base)  # moneyness_std's vol: the contract's previous IV
    w = lambda kk, tt: SmileInMoneynessStd.iv(kk / (prev_iv * tt.sqrt())) ** 2 * tt  # noqa: E731
    calendar, butterfly = L.arbitrage_penalties(w(k, tau), w(k + dk, tau), w(k - dk, tau), w(k, tau + dtau), k, dk,
                                                dtau)
    assert butterfly.item() > 0.05  # the closed form does violate it
    assert result.history[0]["train/butterfly_penalty"] == pytest.approx(butterfly.item(), rel=1e-3)
    assert result.history[0]["train/calendar_penalty"] == pytest.approx(calendar.item(), rel=1e-3, abs=1e-6)
