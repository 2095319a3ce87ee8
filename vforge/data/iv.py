"""Black-Scholes-Merton prices, vega, and a vectorized implied-volatility inverter.

Everything works on forward terms: ``F = S exp((r - q) T)``, discount ``D = exp(-r T)``.
The inverter solves on the out-of-the-money side (puts below the forward, calls above),
in log price, with Newton steps safeguarded by a bisection bracket, so deep wings and
short expiries converge as well as the money does.
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_ndtr, ndtr

# Reason codes returned beside NaN volatilities.
OK, BELOW_INTRINSIC, ABOVE_UPPER_BOUND, ZERO_TIME, ZERO_PRICE, NO_CONVERGENCE, INVALID_INPUT = range(7)
REASONS = {
    OK: "ok",
    BELOW_INTRINSIC: "price at or below intrinsic value",
    ABOVE_UPPER_BOUND: "price at or above the no-arbitrage upper bound",
    ZERO_TIME: "zero or negative time to expiry",
    ZERO_PRICE: "zero or negative price",
    NO_CONVERGENCE: "inverter did not converge",
    INVALID_INPUT: "missing or non-finite input",
}
SIGMA_MAX = 20.0  # volatility bracket top (2000%)


def _as_arrays(*args):
    return np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in args))


def forward(spot, tau, rate, dividend_yield):
    return np.asarray(spot) * np.exp((np.asarray(rate) - np.asarray(dividend_yield)) * np.asarray(tau))


def bs_price(forward_, strike, tau, sigma, rate, is_call):
    """Undiscounted-by-nothing BSM price of a European option on forward terms.

    >>> round(float(bs_price(100.0, 100.0, 1.0, 0.2, 0.0, True)), 6)
    7.965567
    """
    f, k, t, s, r, c = _as_arrays(forward_, strike, tau, sigma, rate, is_call)
    sd = s * np.sqrt(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        d1 = np.log(f / k) / sd + 0.5 * sd
    d2 = d1 - sd
    sign = np.where(c > 0, 1.0, -1.0)
    disc = np.exp(-r * t)
    return disc * sign * (f * ndtr(sign * d1) - k * ndtr(sign * d2))


def bs_vega(forward_, strike, tau, sigma, rate):
    """dPrice/dsigma (same for calls and puts)."""
    f, k, t, s, r = _as_arrays(forward_, strike, tau, sigma, rate)
    sd = s * np.sqrt(t)
    d1 = np.log(f / k) / sd + 0.5 * sd
    return np.exp(-r * t) * f * np.sqrt(t) * np.exp(-0.5 * d1 * d1) / np.sqrt(2 * np.pi)


def _log_otm_normalized(x, s):
    """log of the normalized OTM price b = e^{x/2} N(x/s + s/2) - e^{-x/2} N(x/s - s/2), x <= 0.

    Computed as log(e^{x/2} N(d1)) + log1p(-e^{-x} N(d2)/N(d1)) in log space to keep
    precision where both terms are tiny.
    """
    d1 = x / s + 0.5 * s
    d2 = x / s - 0.5 * s
    la = 0.5 * x + log_ndtr(d1)
    lb = -0.5 * x + log_ndtr(d2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return la + np.log1p(-np.exp(np.minimum(lb - la, 0.0)))


def implied_vol(price, forward_, strike, tau, rate, is_call, *, tol: float = 1e-13, max_iter: int = 100):
    """Invert BSM prices to volatilities.

    Returns ``(sigma, reason)``: ``sigma`` is NaN wherever ``reason != OK`` (see ``REASONS``).
    Accurate to ~1e-12 in volatility wherever the price lies strictly inside the bounds
    (intrinsic, upper bound) and its normalized OTM value is representable.
    """
    p, f, k, t, r, c = _as_arrays(price, forward_, strike, tau, rate, is_call)
    shape = p.shape
    p, f, k, t, r, c = (a.ravel() for a in (p, f, k, t, r, c))
    sigma = np.full(p.shape, np.nan)
    reason = np.full(p.shape, OK, dtype=np.int8)

    disc = np.exp(-r * t)
    call = c > 0
    intrinsic = np.where(call, np.maximum(f - k, 0.0), np.maximum(k - f, 0.0)) * disc
    upper = np.where(call, f, k) * disc
    finite = np.isfinite(p) & np.isfinite(f) & np.isfinite(k) & np.isfinite(t) & np.isfinite(r) & (f > 0) & (k > 0)
    reason[~finite] = INVALID_INPUT
    reason[(reason == OK) & (p <= 0)] = ZERO_PRICE
    reason[(reason == OK) & (t <= 0)] = ZERO_TIME
    reason[(reason == OK) & (p <= intrinsic)] = BELOW_INTRINSIC
    reason[(reason == OK) & (p >= upper)] = ABOVE_UPPER_BOUND
    ok = reason == OK
    if not ok.any():
        return sigma.reshape(shape), reason.reshape(shape)

    # Normalized OTM price: subtract intrinsic (put-call parity), divide by D sqrt(FK).
    fo, ko, to = f[ok], k[ok], t[ok]
    x = np.log(fo / ko)
    otm = (p[ok] - intrinsic[ok]) / (disc[ok] * np.sqrt(fo * ko))
    # b(x) = b(-x) for the OTM price, so solve with x <= 0.
    x = -np.abs(x)
    log_target = np.log(otm)
    if np.any(~np.isfinite(log_target)):
        raise AssertionError("normalized OTM price must be positive here")

    # Solve in s = sigma sqrt(T); bracket [lo, hi] shrinks every step.
    lo = np.zeros_like(x)
    hi = np.full_like(x, SIGMA_MAX) * np.sqrt(to)
    # The normalized price is bounded by 1; beyond hi we cannot bracket.
    s = np.clip(np.sqrt(2.0 * np.abs(x)) + 0.2, 1e-4, None)
    s = np.minimum(s, 0.5 * hi)
    for _ in range(max_iter):
        g = _log_otm_normalized(x, s) - log_target
        lo = np.where(g < 0, s, lo)
        hi = np.where(g > 0, s, hi)
        # d log b / ds = phi(d1) e^{x/2} / b
        d1 = x / s + 0.5 * s
        log_db = 0.5 * x - 0.5 * d1 * d1 - 0.5 * np.log(2 * np.pi)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            step = g / np.exp(log_db - _log_otm_normalized(x, s))
        s_new = s - step
        bad = ~np.isfinite(s_new) | (s_new <= lo) | (s_new >= hi)
        s_new = np.where(bad, 0.5 * (lo + hi), s_new)
        done = np.abs(s_new - s) <= tol * np.maximum(s, 1e-3)
        s = s_new
        if done.all():
            break
    sig = s / np.sqrt(to)
    converged = np.abs(_log_otm_normalized(x, s) - log_target) < 1e-8
    out = sigma[ok]
    out[converged] = sig[converged]
    sigma[ok] = out
    rsub = reason[ok]
    rsub[~converged] = NO_CONVERGENCE
    reason[ok] = rsub
    return sigma.reshape(shape), reason.reshape(shape)
