"""Heston (and Bates) European option prices by the COS method, vectorized.

Fang & Oosterlee (2008), "A novel pricing method for European options based on Fourier-cosine
series expansions" (https://doi.org/10.1137/080718061). Puts are priced by the expansion and
calls by put-call parity, which is the numerically stable choice.
"""

from __future__ import annotations

import numpy as np


def heston_cf(u, tau, v0, kappa, theta, sigma, rho, jump_intensity=0.0, jump_mean=0.0, jump_std=0.0):
    """Characteristic function of log(S_T / F) under Heston (+ Merton jumps), "little trap" form.

    Shapes broadcast: ``u`` (..., n_terms), model arguments (..., 1).
    """
    iu = 1j * u
    beta = kappa - rho * sigma * iu
    d = np.sqrt(beta * beta + sigma * sigma * (iu + u * u))
    g = (beta - d) / (beta + d)
    e = np.exp(-d * tau)
    c = kappa * theta / sigma**2 * ((beta - d) * tau - 2.0 * np.log((1.0 - g * e) / (1.0 - g)))
    dd = (beta - d) / sigma**2 * (1.0 - e) / (1.0 - g * e)
    log_cf = c + dd * v0
    if np.any(np.asarray(jump_intensity) > 0):
        jump_comp = np.exp(jump_mean + 0.5 * jump_std**2) - 1.0
        log_cf = log_cf + jump_intensity * tau * (
            np.exp(iu * jump_mean - 0.5 * jump_std**2 * u * u) - 1.0 - iu * jump_comp
        )
    return np.exp(log_cf)


def _cumulants(tau, v0, kappa, theta, sigma, rho):
    """First two cumulants of log(S_T/F) (Fang & Oosterlee 2008, Table 11)."""
    e = np.exp(-kappa * tau)
    c1 = (1.0 - e) * (theta - v0) / (2.0 * kappa) - 0.5 * theta * tau
    c2 = (
        1.0
        / (8.0 * kappa**3)
        * (
            sigma * tau * kappa * e * (v0 - theta) * (8.0 * kappa * rho - 4.0 * sigma)
            + kappa * rho * sigma * (1.0 - e) * (16.0 * theta - 8.0 * v0)
            + 2.0 * theta * kappa * tau * (-4.0 * kappa * rho * sigma + sigma**2 + 4.0 * kappa**2)
            + sigma**2 * ((theta - 2.0 * v0) * e * e + theta * (6.0 * e - 7.0) + 2.0 * v0)
            + 8.0 * kappa**2 * (v0 - theta) * (1.0 - e)
        )
    )
    return c1, np.abs(c2)


def heston_price(
    spot,
    strike,
    tau,
    rate,
    dividend_yield,
    is_call,
    *,
    v0,
    kappa,
    theta,
    sigma,
    rho,
    jump_intensity: float = 0.0,
    jump_mean: float = 0.0,
    jump_std: float = 0.0,
    n_terms: int = 256,
    truncation: float = 20.0,
    chunk: int = 20_000,
):
    """European option prices under Heston/Bates. Array arguments broadcast to (n_options,).

    ``v0`` may be an array (one variance per option, e.g. a simulated path); the other model
    parameters are scalars.

    >>> p = heston_price(100.0, 100.0, 0.5, 0.03, 0.0, True, v0=0.04, kappa=1.5, theta=0.04, sigma=0.3, rho=-0.9)
    >>> p.shape
    (1,)
    """
    s, k, t, r, q, c, v = (
        np.atleast_1d(a).astype(np.float64) for a in np.broadcast_arrays(spot, strike, tau, rate, dividend_yield, is_call, v0)
    )
    out = np.empty(s.shape)
    for lo in range(0, s.size, chunk):
        sl = slice(lo, lo + chunk)
        out[sl] = _price_chunk(
            s[sl], k[sl], t[sl], r[sl], q[sl], c[sl] > 0, v[sl], kappa, theta, sigma, rho,
            jump_intensity, jump_mean, jump_std, n_terms, truncation,
        )
    return out


def _price_chunk(s, k, t, r, q, call, v0, kappa, theta, sigma, rho, lam, mu_j, sd_j, n_terms, truncation):
    fwd = s * np.exp((r - q) * t)
    c1, c2 = _cumulants(t, v0, kappa, theta, sigma, rho)
    # Jumps widen the distribution: add their variance to the second cumulant.
    c2 = c2 + lam * t * (mu_j**2 + sd_j**2)
    half = truncation * np.sqrt(c2 + 1e-12)
    x = np.log(fwd / k)  # y = log(S_T/K) = x + log(S_T/F)
    a = (x + c1 - half)[:, None]  # interval for y, (n, 1)
    b = (x + c1 + half)[:, None]
    kk = np.arange(n_terms)[None, :]
    w = kk * np.pi / (b - a)  # (n, n_terms)
    # w depends on (tau, v0) only, so the characteristic function is evaluated once per
    # distinct pair (one per expiry and day on a simulated path), not once per option.
    pairs, inverse = np.unique(np.column_stack([t, v0]), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    first = np.zeros(len(pairs), dtype=np.int64)
    first[inverse[::-1]] = np.arange(len(t))[::-1]
    cf = heston_cf(w[first], pairs[:, :1], pairs[:, 1:], kappa, theta, sigma, rho, lam, mu_j, sd_j)[inverse]
    # Put payoff K (1 - e^y)^+ lives on [a, min(b, 0)].
    d = np.minimum(b, 0.0)
    upper_ok = (d > a)[:, 0]
    chi = (
        np.cos(w * (d - a)) * np.exp(d)
        - np.exp(a)
        + w * np.sin(w * (d - a)) * np.exp(d)
    ) / (1.0 + w * w)
    with np.errstate(divide="ignore", invalid="ignore"):
        psi = np.where(kk == 0, d - a, np.sin(w * (d - a)) / w)
    vk = 2.0 / (b - a) * (psi - chi)
    # The series expands the density of y; e^{i w (x - a)} shifts log(S_T/F) to y.
    terms = (cf * np.exp(1j * w * (x[:, None] - a))).real * vk
    terms[:, 0] *= 0.5
    put = k * np.exp(-r * t) * terms.sum(axis=1)
    put = np.where(upper_ok, put, 0.0)
    put = np.maximum(put, 0.0)
    call_price = put + np.exp(-r * t) * (fwd - k)
    return np.where(call, call_price, put)
