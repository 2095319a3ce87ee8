"""Black-Scholes-Merton prices, vega, and a vectorized implied-volatility inverter.

Everything works on forward terms: ``F = S exp((r - q) T)``, discount ``D = exp(-r T)``.

The inverter follows the ideas of P. Jaeckel, "Let's be rational" (Wilmott 2015,
http://www.jaeckel.org/LetsBeRational.pdf), in plain numpy:

* it solves for the total volatility ``s = sigma sqrt(T)`` on the normalized out-of-the-money
  price ``b(x, s) = e^{x/2} N(x/s + s/2) - e^{-x/2} N(x/s - s/2)`` with ``x = -|ln(F/K)|``,
  which is symmetric in calls and puts and bounded by ``(0, e^{x/2})``;
* the two sides of the inflection point ``s_c = sqrt(2|x|)`` get different objectives: below it
  ``ln b`` (the price is exponentially small there), above it ``ln(e^{x/2} - b)``, whose target
  is computed from the distance of the price to its upper bound, so that neither side loses
  digits to cancellation;
* third-order Householder steps with closed-form derivatives, safeguarded by a bracket that
  shrinks every step (bisection when a step leaves it), iterating only on the unconverged rows.

Accurate to ~1e-13 in total volatility wherever the time value of the price is representable;
the benchmark is ``scripts/bench_iv.py``.
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_ndtr, ndtr, ndtri

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
_LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)


def _as_arrays(*args):
    return np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in args))


def forward(spot, tau, rate, dividend_yield):
    """``S exp((r - q) T)``."""
    return np.asarray(spot) * np.exp((np.asarray(rate) - np.asarray(dividend_yield)) * np.asarray(tau))


def bs_price(forward_, strike, tau, sigma, rate, is_call):
    """Discounted BSM price of a European option on forward terms, ``D (F N(d1) - K N(d2))`` for calls.

    Zero time or zero volatility gives the discounted intrinsic value.

    >>> round(float(bs_price(100.0, 100.0, 1.0, 0.2, 0.0, True)), 6)
    7.965567
    """
    f, k, t, s, r, c = _as_arrays(forward_, strike, tau, sigma, rate, is_call)
    disc = np.exp(-r * t)
    intrinsic = np.where(c > 0, np.maximum(f - k, 0.0), np.maximum(k - f, 0.0))
    # Intrinsic value plus the OTM value by put-call parity: the OTM value is computed in log
    # space, so far wings keep their relative precision instead of cancelling N(d1) against N(d2).
    with np.errstate(divide="ignore", invalid="ignore"):
        otm = np.sqrt(f * k) * np.exp(_log_b(-np.abs(np.log(f / k)), s * np.sqrt(np.maximum(t, 0.0))))
    return disc * (intrinsic + np.where(s * np.sqrt(np.maximum(t, 0.0)) > 0, otm, 0.0))


def bs_vega(forward_, strike, tau, sigma, rate):
    """dPrice/dsigma (the same for calls and puts): ``D F sqrt(T) phi(d1)``.

    >>> round(float(bs_vega(100.0, 100.0, 1.0, 0.2, 0.0)), 6)
    39.695255
    """
    f, k, t, s, r = _as_arrays(forward_, strike, tau, sigma, rate)
    sd = s * np.sqrt(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        d1 = np.log(f / k) / sd + 0.5 * sd
    return np.exp(-r * t) * f * np.sqrt(t) * np.exp(-0.5 * d1 * d1) / np.sqrt(2 * np.pi)


def bs_delta(forward_, strike, tau, sigma, rate, dividend_yield, is_call):
    """dPrice/dSpot: ``e^{-qT} N(d1)`` for calls, ``-e^{-qT} N(-d1)`` for puts."""
    f, k, t, s, r, q, c = _as_arrays(forward_, strike, tau, sigma, rate, dividend_yield, is_call)
    sd = s * np.sqrt(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        d1 = np.log(f / k) / sd + 0.5 * sd
    return np.where(c > 0, ndtr(d1), -ndtr(-d1)) * np.exp(-q * t)


def _log_b(x, s):
    """ln b for x <= 0, s > 0, as ln(e^{x/2} N(d1)) + ln(1 - e^{-x} N(d2) / N(d1)) in log space."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d1 = x / s + 0.5 * s
        la = 0.5 * x + log_ndtr(d1)
        lb = -0.5 * x + log_ndtr(d1 - s)
        return la + np.log1p(-np.exp(np.minimum(lb - la, 0.0)))


def _log_u(x, s):
    """ln(e^{x/2} - b) = ln(e^{x/2} N(-d1) + e^{-x/2} N(d2)): a sum of positives, no cancellation."""
    with np.errstate(divide="ignore", invalid="ignore"):
        d1 = x / s + 0.5 * s
        return np.logaddexp(0.5 * x + log_ndtr(-d1), -0.5 * x + log_ndtr(d1 - s))


def _householder_step(x, s, g, r):
    """Third-order step for an objective ``g(s) = ln(+-b(s) or u(s)) - target`` with ``g' = r``.

    b' = exp(-(x^2/s^2 + s^2/4) / 2) / sqrt(2 pi), b''/b' = x^2/s^3 - s/4,
    b'''/b' = (b''/b')^2 - 3 x^2/s^4 - 1/4; for g = ln f with f' = +-b', g' = r = f'/f,
    g'' = r a - r^2, g''' = r c - 3 r^2 a + 2 r^3.
    """
    a = x * x / s**3 - 0.25 * s
    c = a * a - 3.0 * x * x / s**4 - 0.25
    g2 = r * a - r * r
    g3 = r * c - 3.0 * r * r * a + 2.0 * r**3
    nu = -g / r
    h2, h3 = g2 / r, g3 / r
    return nu * (1.0 + 0.5 * h2 * nu) / (1.0 + h2 * nu + h3 * nu * nu / 6.0)


def _solve(x, log_target_b, log_target_u, *, tol: float, max_iter: int):
    """Total volatility s with b(x, s) = target, x <= 0. Returns ``(s, converged)``."""
    n = x.shape[0]
    s_c = np.sqrt(-2.0 * x)
    log_b_c = _log_b(x, s_c)
    log_b_c = np.where(s_c > 0, log_b_c, -np.inf)  # x = 0: everything is in the upper branch
    lower = log_target_b < log_b_c
    lo = np.where(lower, 0.0, s_c)
    hi = np.where(lower, s_c, np.inf)
    # Initial guesses from the asymptotics of each branch: ln b ~ -x^2 / (2 s^2) as s -> 0, and
    # u ~ 2 e^{x/2} N(-s/2) as s -> infinity (exact at x = 0).
    with np.errstate(divide="ignore", invalid="ignore"):
        s_low = -x / np.sqrt(np.maximum(-2.0 * log_target_b, 1e-300))
        s_up = -2.0 * ndtri(np.minimum(0.5 * np.exp(log_target_u - 0.5 * x), 0.5))
    s = np.where(lower, np.clip(s_low, 0.5 * lo + 1e-300, s_c), np.maximum(s_up, s_c))
    s = np.where(np.isfinite(s) & (s > 0), s, np.where(lower, 0.5 * s_c, s_c + 1.0))
    converged = np.zeros(n, dtype=bool)
    active = np.arange(n)
    for _ in range(max_iter):
        xa, sa, low = x[active], s[active], lower[active]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            log_f = np.where(low, _log_b(xa, sa), _log_u(xa, sa))
            g = log_f - np.where(low, log_target_b[active], log_target_u[active])
            log_db = -0.5 * (xa * xa / (sa * sa) + 0.25 * sa * sa) - _LOG_SQRT_2PI
            r = np.where(low, 1.0, -1.0) * np.exp(log_db - log_f)
            # g increases in s on the lower branch and decreases on the upper one.
            too_high = np.where(low, g > 0, g < 0)
            la, ha = lo[active], hi[active]
            la = np.where(too_high, la, sa)
            ha = np.where(too_high, sa, ha)
            step = _householder_step(xa, sa, g, r)
            s_new = sa + step
        done = (g == 0) | (np.abs(step) <= tol * sa) | (ha - la <= tol * sa)
        bad = ~done & (~np.isfinite(s_new) | (s_new <= la) | (s_new >= ha))
        fallback = np.where(np.isfinite(ha), 0.5 * (la + ha), 2.0 * sa)
        s_new = np.where(bad, fallback, np.where(g == 0, sa, s_new))
        s[active], lo[active], hi[active] = s_new, la, ha
        converged[active[done]] = True
        active = active[~done]
        if active.size == 0:
            break
    return s, converged


def implied_vol(price, forward_, strike, tau, rate, is_call, *, tol: float = 1e-14, max_iter: int = 60):
    """Invert discounted BSM prices to volatilities.

    Returns ``(sigma, reason)``: ``sigma`` is NaN wherever ``reason != OK`` (see ``REASONS``).
    Bounds: ``D max(F - K, 0) < call < D F`` and ``D max(K - F, 0) < put < D K``.

    >>> sigma, reason = implied_vol(7.965567455405804, 100.0, 100.0, 1.0, 0.0, True)
    >>> round(float(sigma), 12), int(reason)
    (0.2, 0)
    """
    p, f, k, t, r, c = _as_arrays(price, forward_, strike, tau, rate, is_call)
    shape = p.shape
    p, f, k, t, r, c = (a.ravel() for a in (p, f, k, t, r, c))
    sigma = np.full(p.shape, np.nan)
    reason = np.full(p.shape, OK, dtype=np.int8)

    with np.errstate(invalid="ignore", over="ignore"):
        disc = np.exp(-r * t)
        call = c > 0
        intrinsic = np.where(call, np.maximum(f - k, 0.0), np.maximum(k - f, 0.0)) * disc
        upper = np.where(call, f, k) * disc
        finite = (np.isfinite(p) & np.isfinite(f) & np.isfinite(k) & np.isfinite(t) & np.isfinite(r)
                  & (f > 0) & (k > 0))
    reason[~finite] = INVALID_INPUT
    reason[(reason == OK) & (t <= 0)] = ZERO_TIME
    reason[(reason == OK) & (p <= 0)] = ZERO_PRICE
    reason[(reason == OK) & (p <= intrinsic)] = BELOW_INTRINSIC
    reason[(reason == OK) & (p >= upper)] = ABOVE_UPPER_BOUND
    ok = np.flatnonzero(reason == OK)
    if ok.size == 0:
        return sigma.reshape(shape), reason.reshape(shape)

    fo, ko, to, po, do = f[ok], k[ok], t[ok], p[ok], disc[ok]
    x = -np.abs(np.log(fo / ko))
    norm = do * np.sqrt(fo * ko)
    # Both targets straight from the price: its distance to intrinsic (the OTM value by parity)
    # and to the upper bound.
    with np.errstate(divide="ignore"):
        log_b = np.log((po - intrinsic[ok]) / norm)
        log_u = np.log((upper[ok] - po) / norm)
    s, converged = _solve(x, log_b, log_u, tol=tol, max_iter=max_iter)
    sigma[ok] = np.where(converged, s / np.sqrt(to), np.nan)
    reason[ok[~converged]] = NO_CONVERGENCE
    return sigma.reshape(shape), reason.reshape(shape)
