"""BSM pricing and the implied-volatility inverter: published values, round trips, reason codes."""

from __future__ import annotations

import numpy as np
import pytest

from vforge.data import iv
from vforge.data.iv import bs_delta, bs_price, bs_vega, implied_vol

EPS = np.finfo(float).eps


@pytest.mark.parametrize(
    ("spot", "strike", "tau", "rate", "div", "sigma", "is_call", "expected"),
    [
        # Hull, Options, Futures and Other Derivatives, Example 15.6 (c = 4.76, p = 0.81).
        (42.0, 40.0, 0.5, 0.10, 0.0, 0.2, True, 4.7594),
        (42.0, 40.0, 0.5, 0.10, 0.0, 0.2, False, 0.8086),
        # Haug, The Complete Guide to Option Pricing Formulas (2007), 1.1.1 (Black-Scholes) and
        # 1.1.6 (Merton 1973, continuous dividend yield).
        (60.0, 65.0, 0.25, 0.08, 0.0, 0.3, True, 2.1334),
        (100.0, 95.0, 0.5, 0.10, 0.05, 0.2, False, 2.4648),
    ],
)
def test_bs_price_matches_published_values(spot, strike, tau, rate, div, sigma, is_call, expected):
    fwd = iv.forward(spot, tau, rate, div)
    price = float(bs_price(fwd, strike, tau, sigma, rate, is_call))
    assert price == pytest.approx(expected, abs=5e-5)
    sigma_back, reason = implied_vol(price, fwd, strike, tau, rate, is_call)
    assert int(reason) == iv.OK and float(sigma_back) == pytest.approx(sigma, abs=1e-12)


def test_vega_and_delta_are_the_derivatives_of_the_price():
    f, k, t, s, r, q = 105.0, 100.0, 0.7, 0.3, 0.02, 0.01
    h = 1e-6
    num_vega = (bs_price(f, k, t, s + h, r, True) - bs_price(f, k, t, s - h, r, True)) / (2 * h)
    assert float(bs_vega(f, k, t, s, r)) == pytest.approx(float(num_vega), rel=1e-7)
    spot = f * np.exp(-(r - q) * t)
    for call in (True, False):
        up = bs_price(iv.forward(spot + h, t, r, q), k, t, s, r, call)
        dn = bs_price(iv.forward(spot - h, t, r, q), k, t, s, r, call)
        assert float(bs_delta(f, k, t, s, r, q, call)) == pytest.approx(float((up - dn) / (2 * h)), rel=1e-6)


def grid():
    """Wide grid: ln(K/F) in [-3, 3], 1 day to 5 years, vol 1% to 300%, calls and puts."""
    m = np.linspace(-3.0, 3.0, 61)
    tau = np.array([1 / 365, 7 / 365, 30 / 365, 0.25, 1.0, 2.0, 5.0])
    vol = np.array([0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 2.0, 3.0])
    m, tau, vol, call = (a.ravel() for a in np.meshgrid(m, tau, vol, [0.0, 1.0], indexing="ij"))
    fwd, rate = 100.0, 0.03
    strike = fwd * np.exp(m)
    price = bs_price(fwd, strike, tau, vol, rate, call)
    return m, tau, vol, call, fwd, strike, rate, price


def test_round_trip_out_of_the_money_to_1e_10():
    m, tau, vol, call, fwd, strike, rate, price = grid()
    otm = np.where(call > 0, m >= 0, m <= 0)
    sigma, reason = implied_vol(price[otm], fwd, strike[otm], tau[otm], rate, call[otm])
    # Every OTM price that did not underflow to 0 inverts; 0 gets its reason code.
    assert set(np.unique(reason)) <= {iv.OK, iv.ZERO_PRICE}
    assert np.all((reason == iv.ZERO_PRICE) == (price[otm] <= 0))
    # Subnormal prices (below ~2e-308) keep only a few significant digits; the spec is about the rest.
    good = (reason == iv.OK) & (price[otm] > np.finfo(float).tiny)
    assert good.sum() > 0.65 * otm.sum()
    err = np.abs(sigma[good] - vol[otm][good])
    assert err.max() < 1e-10, f"worst OTM round-trip error {err.max():.2e}"


def test_round_trip_in_the_money_within_the_price_conditioning():
    """ITM prices carry their time value under the intrinsic value's rounding: vol is recovered to 1e-10
    where one ulp of the price moves vol by less than 1e-12, and to a few ulps of price / vega elsewhere."""
    m, tau, vol, call, fwd, strike, rate, price = grid()
    itm = np.where(call > 0, m < 0, m > 0)
    sigma, reason = implied_vol(price[itm], fwd, strike[itm], tau[itm], rate, call[itm])
    cond = EPS * price[itm] / np.maximum(bs_vega(fwd, strike[itm], tau[itm], vol[itm], rate), 1e-300)
    good = reason == iv.OK
    err = np.abs(sigma - vol[itm])
    assert np.all(err[good & (cond < 1e-12)] < 1e-10)
    assert np.all(err[good] < 1e-10 + 16 * cond[good])
    # What fails is a time value lost to rounding: the price equals its intrinsic value in floating point.
    assert set(np.unique(reason[~good])) <= {iv.BELOW_INTRINSIC}
    assert np.all(cond[~good] > 1e-8)


def test_reason_codes():
    f, k, t, r = 100.0, 90.0, 0.5, 0.05
    d = np.exp(-r * t)
    cases = [  # (price, tau, is_call, forward) -> reason
        (d * (f - k), t, True, f, iv.BELOW_INTRINSIC),
        (d * (f - k) - 0.01, t, True, f, iv.BELOW_INTRINSIC),
        (d * f, t, True, f, iv.ABOVE_UPPER_BOUND),
        (d * k + 1.0, t, False, f, iv.ABOVE_UPPER_BOUND),
        (5.0, 0.0, True, f, iv.ZERO_TIME),
        (5.0, -0.1, False, f, iv.ZERO_TIME),
        (0.0, t, False, f, iv.ZERO_PRICE),
        (-1.0, t, True, f, iv.ZERO_PRICE),
        (np.nan, t, True, f, iv.INVALID_INPUT),
        (5.0, t, True, -1.0, iv.INVALID_INPUT),
        (12.0, t, True, f, iv.OK),
    ]
    price, tau, call, fwd, expected = (np.array(c) for c in zip(*cases))
    sigma, reason = implied_vol(price, fwd, k, tau, r, call)
    assert [iv.REASONS[c] for c in reason] == [iv.REASONS[c] for c in expected]
    assert np.isnan(sigma[:-1]).all() and np.isfinite(sigma[-1])


def test_near_the_bounds_and_shapes():
    # Just above intrinsic and just below the upper bound, both sides of the inflection point.
    f, k, t, r = 100.0, 100.0 * np.exp(0.5), 1.0, 0.0
    for vol in (0.02, 0.05, 4.0, 8.0):
        p = bs_price(f, k, t, vol, r, True)
        sigma, reason = implied_vol(p, f, k, t, r, True)
        assert int(reason) == iv.OK and abs(float(sigma) - vol) < 1e-10 * max(1.0, vol)
    sigma, reason = implied_vol(np.full((2, 3), 10.0), 100.0, 100.0, 1.0, 0.0, True)
    assert sigma.shape == reason.shape == (2, 3)


def test_parallel_path_matches_and_initial_guess_keeps_iterations_low():
    """Inputs of at least _PARALLEL_MIN_ROWS go over all threads in chunks; each row's result is the same as
    alone. The initial guesses leave at most 4 Householder steps (2-3 typically) on the benchmark's options."""
    rng = np.random.default_rng(3)
    n = iv._PARALLEL_MIN_ROWS
    fwd, rate = 100.0, 0.02
    strike = fwd * np.exp(rng.uniform(-1.0, 1.0, n))
    tau, vol, call = rng.uniform(1 / 365, 3.0, n), rng.uniform(0.05, 1.0, n), rng.random(n) < 0.5
    price = bs_price(fwd, strike, tau, vol, rate, call)
    sigma, reason, n_iter = iv._implied_vol(price, fwd, strike, tau, rate, call, tol=1e-14, max_iter=60)
    head, head_reason = implied_vol(price[:1000], fwd, strike[:1000], tau[:1000], rate, call[:1000])
    np.testing.assert_array_equal(head, sigma[:1000])
    np.testing.assert_array_equal(head_reason, reason[:1000])
    ok = reason == iv.OK
    assert n_iter[ok].max() <= 4 and n_iter[ok].mean() < 2.6, np.bincount(n_iter[ok])


def test_a_small_inversion_leaves_numbas_thread_pool_unstarted():
    """Below _PARALLEL_MIN_ROWS the rows are inverted on the calling thread (a served request's ~1,000 quotes): the
    thread pool of numba's parallel kernel is never started, whose idle OpenMP threads spin and slowed a serving
    process's next torch calls by 10-100x for seconds (without OMP_WAIT_POLICY=PASSIVE)."""
    import subprocess
    import sys

    code = ("import numpy as np, numba.np.ufunc.parallel as pool; from vforge.data.iv import implied_vol; "
            "s, _ = implied_vol(np.full(1000, 8.0), 100.0, 100.0, 1.0, 0.0, True); "
            "assert np.isfinite(s).all(); print(pool._is_initialized)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
