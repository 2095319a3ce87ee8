"""The COS pricer against published Heston values, an independent quadrature, and Merton's jump series."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import quad

from vforge.data.heston import cumulants, heston_cf, heston_price
from vforge.data.iv import bs_price

FANG_OOSTERLEE = dict(v0=0.0175, kappa=1.5768, theta=0.0398, sigma=0.5751, rho=-0.5711)
LEWIS = dict(v0=0.04, kappa=4.0, theta=0.25, sigma=1.0, rho=-0.5)


@pytest.mark.parametrize(("tau", "expected"), [(1.0, 5.785155450), (10.0, 22.318945791474590)])
def test_fang_oosterlee_2008_reference(tau, expected):
    # Fang & Oosterlee (2008), section 5.2: S = K = 100, r = q = 0, Heston call values for T = 1 and T = 10.
    price = heston_price(100.0, 100.0, tau, 0.0, 0.0, True, **FANG_OOSTERLEE)[0]
    assert abs(price - expected) < 1e-6


def test_lewis_2000_reference():
    # Lewis (2000), "Option Valuation under Stochastic Volatility": S = 100, T = 1, r = 0.01, q = 0.02.
    strikes = [80.0, 90.0, 100.0, 110.0, 120.0]
    expected = [26.774758743998854, 20.933349000596710, 16.070154917028834, 12.132211516709845, 9.024913483457836]
    calls = heston_price(100.0, strikes, 1.0, 0.01, 0.02, True, **LEWIS)
    np.testing.assert_allclose(calls, expected, atol=1e-6)
    # Puts of the same terms satisfy put-call parity.
    puts = heston_price(100.0, strikes, 1.0, 0.01, 0.02, False, **LEWIS)
    parity = 100.0 * math.exp(-0.02) - np.array(strikes) * math.exp(-0.01)
    np.testing.assert_allclose(calls - puts, parity, atol=1e-9)


def gil_pelaez_call(spot, strike, tau, rate, div, **model) -> float:
    """Call by the Gil-Pelaez inversion of the characteristic function with adaptive quadrature (independent of COS)."""
    fwd = spot * math.exp((rate - div) * tau)
    x = math.log(fwd / strike)

    def cf(u):
        return complex(heston_cf(np.array([u]), tau, model["v0"], model["kappa"], model["theta"], model["sigma"],
                                 model["rho"], model.get("jump_intensity", 0.0), model.get("jump_mean", 0.0),
                                 model.get("jump_std", 0.0))[0])

    upper = 200.0 / math.sqrt(tau)  # the integrand decays like exp(-v tau u^2 / 2): short expiries need a long range
    # P1 under the share measure: phi(u - i) / phi(-i), and phi(-i) = 1 for ln(S_T/F).
    p1 = 0.5 + quad(lambda u: (np.exp(1j * u * x) * cf(u - 1j) / (1j * u)).real, 0, upper, limit=1000)[0] / math.pi
    p2 = 0.5 + quad(lambda u: (np.exp(1j * u * x) * cf(u) / (1j * u)).real, 0, upper, limit=1000)[0] / math.pi
    return math.exp(-rate * tau) * (fwd * p1 - strike * p2)


@pytest.mark.parametrize("tau", [7 / 365, 0.25, 2.0])
def test_cos_matches_quadrature_across_strikes(tau):
    model = dict(v0=0.05, kappa=2.0, theta=0.04, sigma=0.6, rho=-0.7)
    strikes = np.array([70.0, 95.0, 100.0, 105.0, 140.0])
    cos = heston_price(100.0, strikes, tau, 0.03, 0.01, True, **model)
    ref = [gil_pelaez_call(100.0, k, tau, 0.03, 0.01, **model) for k in strikes]
    np.testing.assert_allclose(cos, ref, atol=1e-6)


def merton_call(fwd, strike, tau, rate, vol, lam, mu, delta, n_max=60) -> float:
    """Merton (1976) jump-diffusion call as a Poisson mixture of Black-Scholes prices, forward terms."""
    k = math.exp(mu + 0.5 * delta**2) - 1.0
    total = 0.0
    for n in range(n_max):
        weight = math.exp(-lam * tau) * (lam * tau) ** n / math.factorial(n)
        fwd_n = fwd * math.exp(-lam * k * tau + n * (mu + 0.5 * delta**2))
        vol_n = math.sqrt(vol**2 + n * delta**2 / tau)
        total += weight * float(bs_price(fwd_n, strike, tau, vol_n, rate, True))
    return total


@pytest.mark.parametrize("strike", [80.0, 100.0, 120.0])
def test_bates_tends_to_merton_as_vol_of_variance_vanishes(strike):
    # Constant variance (v0 = theta, sigma -> 0, rho = 0) plus Merton jumps is Merton's model.
    lam, mu, delta, theta, tau, rate, div = 0.8, -0.1, 0.15, 0.04, 0.75, 0.02, 0.0
    price = heston_price(100.0, strike, tau, rate, div, True, v0=theta, kappa=1.0, theta=theta, sigma=1e-4, rho=0.0,
                         jump_intensity=lam, jump_mean=mu, jump_std=delta)[0]
    fwd = 100.0 * math.exp((rate - div) * tau)
    assert price == pytest.approx(merton_call(fwd, strike, tau, rate, math.sqrt(theta), lam, mu, delta), abs=1e-6)


def test_no_jumps_and_no_vol_of_variance_is_black_scholes():
    tau, rate, div, v = 0.5, 0.03, 0.01, 0.09
    strikes = np.array([60.0, 90.0, 100.0, 130.0])
    price = heston_price(100.0, strikes, tau, rate, div, False, v0=v, kappa=1.5, theta=v, sigma=1e-4, rho=0.0)
    fwd = 100.0 * math.exp((rate - div) * tau)
    np.testing.assert_allclose(price, bs_price(fwd, strikes, tau, 0.3, rate, False), atol=1e-6)


def test_cumulants_match_the_characteristic_function():
    h = 1e-4
    model = dict(kappa=2.0, theta=0.04, sigma=0.3, rho=-0.5, jump_intensity=0.5, jump_mean=-0.05, jump_std=0.1)
    for tau, v0 in ((0.1, 0.02), (1.0, 0.06)):
        log_cf = lambda u, tau=tau, v0=v0: np.log(heston_cf(np.array([u]), tau, v0, **model))[0]  # noqa: E731
        mean = ((log_cf(h) - log_cf(-h)) / (2 * h) / 1j).real
        c1, c2 = cumulants(tau, v0, **model)
        assert c1 == pytest.approx(mean, abs=1e-7)
        var = -((log_cf(h) - 2 * log_cf(0.0) + log_cf(-h)) / h**2).real
        assert c2 == pytest.approx(var, rel=0.05)  # the truncation width only needs the scale


def test_vectorized_per_option_variance_and_bounds():
    v0 = np.array([0.01, 0.04, 0.09, 0.04])
    one_by_one = [heston_price(100.0, 100.0, 0.3, 0.0, 0.0, True, v0=v, kappa=2.0, theta=0.04, sigma=0.5,
                               rho=-0.6)[0] for v in v0]
    together = heston_price(100.0, 100.0, 0.3, 0.0, 0.0, True, v0=v0, kappa=2.0, theta=0.04, sigma=0.5, rho=-0.6)
    np.testing.assert_allclose(together, one_by_one, rtol=1e-12)
    assert together[0] < together[1] < together[2]
    # Far from the money: never below intrinsic, never negative.
    deep = heston_price(100.0, [10.0, 400.0], 1 / 365, 0.0, 0.0, [True, False], v0=0.04, kappa=2.0, theta=0.04,
                        sigma=0.5, rho=-0.6)
    np.testing.assert_allclose(deep, [90.0, 300.0], atol=1e-9)
