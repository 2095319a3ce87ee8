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

import math

import numba
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


VEGA_UNITS = ("price", "forward", "discounted_forward")


def bs_vega(forward_, strike, tau, sigma, rate, unit="price"):
    """dPrice/dsigma (the same for calls and puts), in ``unit``: ``price`` ``D F sqrt(T) phi(d1)``; ``forward``
    per unit of forward, ``D sqrt(T) phi(d1)``; ``discounted_forward`` per unit of discounted forward,
    ``sqrt(T) phi(d1)`` (``D = exp(-rT)``). The one vega of vforge: the spread filter, the losses' weights and
    ``Split.aux`` call it.

    >>> round(float(bs_vega(100.0, 100.0, 1.0, 0.2, 0.0)), 6)
    39.695255
    >>> round(float(bs_vega(100.0, 100.0, 1.0, 0.2, 0.0, unit="discounted_forward")), 8)
    0.39695255
    """
    if unit not in VEGA_UNITS:
        raise ValueError(f"vega unit must be one of {', '.join(VEGA_UNITS)}, got {unit!r}")
    f, k, t, s, r = _as_arrays(forward_, strike, tau, sigma, rate)
    sd = s * np.sqrt(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        d1 = np.log(f / k) / sd + 0.5 * sd
    vega = np.sqrt(t) * np.exp(-0.5 * d1 * d1) / np.sqrt(2 * np.pi)
    if unit == "discounted_forward":
        return vega
    return np.exp(-r * t) * (f if unit == "price" else 1.0) * vega


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


_SQRT_HALF = math.sqrt(0.5)

# The inverter is scalar code compiled by numba: one pass per row, rows spread over the cores, no
# temporary arrays, and a row leaves the loop the moment it converges. ``cache=True`` keeps the machine
# code in __pycache__, so only the first call on a machine pays the compilation.
_jit = numba.njit(cache=True, nogil=True)
_CHUNK, _PARALLEL_MIN_ROWS = 4096, 50_000


@_jit
def _log_ndtr1(z):
    """ln N(z), accurate in both tails (the three regimes of scipy's ``log_ndtr``)."""
    if z > 6.0:
        return math.log1p(-0.5 * math.erfc(z * _SQRT_HALF))
    if z > -20.0:
        return math.log(0.5 * math.erfc(-z * _SQRT_HALF))
    # N(z) = phi(z) / |z| (1 - 1/z^2 + 3/z^4 - ...): the asymptotic series converges fast for |z| >= 20.
    z2 = z * z
    term, total = 1.0, 1.0
    for i in range(1, 40):
        term *= -(2 * i - 1) / z2
        total += term
        if abs(term) < 1e-17 * total:
            break
    return -0.5 * z2 - math.log(-z) - _LOG_SQRT_2PI + math.log(total)


@_jit
def _log_b1(x, s, e):
    """Scalar ``_log_b``, given ``e = e^{x/2}``.

    Where neither N(d) is below ~1e-89 the difference is taken directly: its relative error is then
    eps / (1 - e^{-x} N(d2) / N(d1)), while the difference of logs adds |ln N| eps to that.
    """
    d1 = x / s + 0.5 * s
    d2 = d1 - s
    if d2 > -20.0:
        diff = 0.5 * (e * math.erfc(-d1 * _SQRT_HALF) - math.erfc(-d2 * _SQRT_HALF) / e)
        if diff > 0:
            return math.log(diff)
    la = 0.5 * x + _log_ndtr1(d1)
    lb = -0.5 * x + _log_ndtr1(d2)
    return la + math.log1p(-math.exp(min(lb - la, 0.0)))


@_jit
def _log_u1(x, s, e):
    """ln(e^{x/2} - b) = ln(e^{x/2} N(-d1) + e^{-x/2} N(d2)), given ``e = e^{x/2}``: a sum of positives."""
    d1 = x / s + 0.5 * s
    d2 = d1 - s
    if d2 > -20.0:  # then -d1 > d2 too: no underflow
        return math.log(0.5 * (e * math.erfc(d1 * _SQRT_HALF) + math.erfc(-d2 * _SQRT_HALF) / e))
    a = 0.5 * x + _log_ndtr1(-d1)
    b = -0.5 * x + _log_ndtr1(d2)
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


@_jit
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


@_jit
def _solve(x, log_target_b, log_target_u, tol, max_iter):
    """Total volatility s with b(x, s) = target, x <= 0. Returns ``(s, iterations)``, iterations -1 if not converged."""
    s_c = math.sqrt(-2.0 * x)
    e = math.exp(0.5 * x)
    # At s_c, d1 = 0 and d2 = -s_c: b_c = e^{x/2} / 2 - e^{-x/2} N(-s_c), one erfc. x = 0: all in the upper branch.
    b_c = 0.5 * (e - math.erfc(s_c * _SQRT_HALF) / e)
    log_b_c = math.log(b_c) if b_c > 0 else (_log_b1(x, s_c, e) if s_c > 0 else -math.inf)
    lower = log_target_b < log_b_c
    lo, hi = (0.0, s_c) if lower else (s_c, math.inf)
    # Initial guesses. Lower branch: the larger of two lower bounds of the root (ln b is concave in s there):
    # the tangent of ln b at s_c, and the root of the small-s asymptote b ~ e^{-x^2/(2 s^2)} s^3 / (x^2 sqrt(2 pi)),
    # i.e. w + 1.5 ln(2 w) = ln|x| - ln sqrt(2 pi) - ln b for w = x^2 / (2 s^2), by Newton's method.
    # Upper branch: the tangent of ln u at s_c (above the root: ln u is concave in s there).
    log_db_c = -0.5 * (x * x / (s_c * s_c) + 0.25 * s_c * s_c) - _LOG_SQRT_2PI if s_c > 0 else -_LOG_SQRT_2PI
    if lower:
        slope = math.exp(log_db_c - log_b_c)
        s_tangent = s_c + (log_target_b - log_b_c) / slope
        big_l = math.log(-x) - _LOG_SQRT_2PI - log_target_b
        w = max(big_l, 1e-3)
        for _ in range(2):
            w = max(w - (w + 1.5 * math.log(2.0 * w) - big_l) / (1.0 + 1.5 / w), 1e-6)
        s = min(max(s_tangent, -x / math.sqrt(2.0 * w), 1e-300), s_c)
    else:
        log_u_c = math.log(e - max(b_c, 0.0))  # u_c > e^{x/2} / 2: no cancellation
        s_tangent = s_c + (log_target_u - log_u_c) / -math.exp(log_db_c - log_u_c)
        s = max(s_tangent, s_c)
    if not (math.isfinite(s) and s > 0):
        s = 0.5 * s_c if lower else s_c + 1.0
    accept = tol ** 0.25
    for it in range(max_iter):
        log_f = _log_b1(x, s, e) if lower else _log_u1(x, s, e)
        g = log_f - (log_target_b if lower else log_target_u)
        log_db = -0.5 * (x * x / (s * s) + 0.25 * s * s) - _LOG_SQRT_2PI
        r = math.exp(log_db - log_f) if lower else -math.exp(log_db - log_f)
        if g == 0:
            return s, it + 1
        # g increases in s on the lower branch and decreases on the upper one.
        if (g > 0) == lower:
            hi = s
        else:
            lo = s
        step = _householder_step(x, s, g, r)
        s_new = s + step
        # The step converges with order 4: once it is below tol^(1/4) relative, the error left after it is
        # ~tol, so the row stops here instead of paying one more evaluation to see a tiny step.
        if abs(step) <= accept * s or hi - lo <= tol * s:
            return s_new, it + 1
        if not math.isfinite(s_new) or s_new <= lo or s_new >= hi:
            s_new = 0.5 * (lo + hi) if math.isfinite(hi) else 2.0 * s
        s = s_new
    return s, -1


@_jit
def _invert_row(i, p, f, k, t, r, c, disc, tol, max_iter, sigma, reason, n_iter):
    """Row ``i``: reason code, then the solve on the OTM-normalized price; writes sigma, reason, n_iter."""
    sigma[i] = math.nan
    n_iter[i] = 0
    pi, fi, ki, ti, di = p[i], f[i], k[i], t[i], disc[i]
    if not (math.isfinite(pi) and math.isfinite(fi) and math.isfinite(ki) and math.isfinite(ti)
            and math.isfinite(r[i]) and fi > 0 and ki > 0):
        reason[i] = INVALID_INPUT
        return
    if ti <= 0:
        reason[i] = ZERO_TIME
        return
    if pi <= 0:
        reason[i] = ZERO_PRICE
        return
    call = c[i] > 0
    intrinsic = (max(fi - ki, 0.0) if call else max(ki - fi, 0.0)) * di
    upper = (fi if call else ki) * di
    if pi <= intrinsic:
        reason[i] = BELOW_INTRINSIC
        return
    if pi >= upper:
        reason[i] = ABOVE_UPPER_BOUND
        return
    # Both targets straight from the price: its distance to intrinsic (the OTM value by parity)
    # and to the upper bound.
    norm = di * math.sqrt(fi * ki)
    s, n = _solve(-abs(math.log(fi / ki)), math.log((pi - intrinsic) / norm), math.log((upper - pi) / norm),
                  tol, max_iter)
    n_iter[i] = n
    if n < 0:
        reason[i] = NO_CONVERGENCE
    else:
        sigma[i] = s / math.sqrt(ti)
        reason[i] = OK


@numba.njit(cache=True, nogil=True, parallel=True)
def _invert(p, f, k, t, r, c, disc, tol, max_iter, sigma, reason, n_iter):
    """``_invert_row`` of every row, rows spread over numba's threads."""
    for i in numba.prange(p.shape[0]):
        _invert_row(i, p, f, k, t, r, c, disc, tol, max_iter, sigma, reason, n_iter)


@_jit
def _invert_serial(p, f, k, t, r, c, disc, tol, max_iter, sigma, reason, n_iter):
    """``_invert_row`` of every row on the calling thread: numba's thread pool is never started for it (its idle
    OpenMP threads spin and, in a serving process, slow torch's next calls by 10-100x for seconds)."""
    for i in range(p.shape[0]):
        _invert_row(i, p, f, k, t, r, c, disc, tol, max_iter, sigma, reason, n_iter)


def implied_vol(price, forward_, strike, tau, rate, is_call, *, tol: float = 1e-14, max_iter: int = 60):
    """Invert discounted BSM prices to volatilities.

    Returns ``(sigma, reason)``: ``sigma`` is NaN wherever ``reason != OK`` (see ``REASONS``).
    Bounds: ``D max(F - K, 0) < call < D F`` and ``D max(K - F, 0) < put < D K``.

    >>> sigma, reason = implied_vol(7.965567455405804, 100.0, 100.0, 1.0, 0.0, True)
    >>> round(float(sigma), 12), int(reason)
    (0.2, 0)
    """
    sigma, reason, _ = _implied_vol(price, forward_, strike, tau, rate, is_call, tol=tol, max_iter=max_iter)
    return sigma, reason


def _implied_vol(price, forward_, strike, tau, rate, is_call, *, tol: float, max_iter: int):
    """``implied_vol`` plus the number of iterations each row took (0: not attempted, -1: did not converge)."""
    args = [np.asarray(a, dtype=np.float64) for a in (price, forward_, strike, tau, rate, is_call)]
    shape = np.broadcast_shapes(*(a.shape for a in args))
    # One memory layout for the kernel (C-contiguous, writeable, float64) so that numba compiles it once.
    p, f, k, t, r, c = (np.require(a.reshape(-1) if a.shape == shape else np.broadcast_to(a, shape).reshape(-1),
                                   np.float64, ["C", "W"]) for a in args)
    with np.errstate(invalid="ignore", over="ignore"):
        disc = np.exp(-r * t)
    sigma, reason, n_iter = np.empty(p.shape), np.empty(p.shape, dtype=np.int8), np.empty(p.shape, dtype=np.int8)
    # Small inputs stay on the calling thread: waking the other threads costs more than they save (up to
    # tens of ms on a loaded machine). Large ones go in dynamic chunks, not one static share per thread, so
    # that on shared cores a thread that is descheduled holds up only its current chunk.
    if p.size < _PARALLEL_MIN_ROWS:
        _invert_serial(p, f, k, t, r, c, disc, float(tol), int(max_iter), sigma, reason, n_iter)
    else:
        with numba.parallel_chunksize(_CHUNK):
            _invert(p, f, k, t, r, c, disc, float(tol), int(max_iter), sigma, reason, n_iter)
    return sigma.reshape(shape), reason.reshape(shape), n_iter.reshape(shape)
