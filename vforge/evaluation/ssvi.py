"""The SSVI baseline: Gatheral & Jacquier 2014, "Arbitrage-free SVI volatility surfaces" (arXiv 1204.0646).

Total implied variance at log-moneyness ``k`` on the expiry whose ATM total variance is ``theta``:

    w(k, theta) = theta / 2 * (1 + rho phi k + sqrt((phi k + rho)^2 + 1 - rho^2)),
    phi(theta) = eta / (theta^gamma (1 + theta)^(1 - gamma))          (the power law, their eq. 4.5)

One surface per information date: ``rho``, ``eta``, ``gamma`` and one ``theta`` per listed expiry, fit to that
date's out-of-the-money quotes by least squares in implied volatility. The no-arbitrage constraints hold by
construction of the parameters: ``|rho| < 1``; ``0 < gamma < 1/2`` and ``eta (1 + |rho|) < 2``, which make the
power-law surface free of butterfly arbitrage (their Remark 4.4 and Theorem 4.2); ``theta`` strictly increasing in
expiry (cumulated positive steps), which with ``gamma <= 1`` makes it free of calendar arbitrage (Theorem 4.1).
Between expiries ``theta`` is linear in time (0 at expiry 0), beyond the last it grows like time (flat ATM vol).

Vectorized: every date is fit at once by Levenberg-Marquardt (one finite-difference Jacobian pass for all dates,
a small solve per date), so a year of daily surfaces fits in about a second. Evaluated at a target row's own log-moneyness and time to expiry
("sticky moneyness"), like the previous surface in the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.special import expit

if TYPE_CHECKING:
    import pandas as pd

MIN_QUOTES = 5
# Box on the unconstrained parameters [a, b, c, u_1..]: |rho| <= tanh(8), eta and gamma's sigmoids kept off 0 and 1,
# each theta step in [softplus(-30), 60] (total variance up to 60 a step: IV 5 at 2 years is 50). Unbounded,
# a near-singular Levenberg-Marquardt step could drive them to +-1e300: theta overflowed, eta underflowed to 0 and
# phi / eta was 0 / 0 in the Jacobian, and the date's fit stayed there (NaN or a wrong surface).
LOWER = np.array([-8.0, -30.0, -30.0])
UPPER = np.array([8.0, 30.0, 30.0])
U_BOUNDS = (-30.0, 60.0)


@dataclass
class SSVIFit:
    """Parameters of one SSVI surface per fit date.

    Shape:
        dates: (n_dates,) the date ids fit (e.g. ``date_idx``)
        taus, theta: (n_dates, n_expiries) padded with NaN beyond a date's expiries, taus increasing
        rho, eta, gamma: (n_dates,)
        rmse: (n_dates,) the fit's RMSE in implied volatility (decimal)
    """

    dates: np.ndarray
    taus: np.ndarray
    theta: np.ndarray
    rho: np.ndarray
    eta: np.ndarray
    gamma: np.ndarray
    rmse: np.ndarray


def total_variance(k: Any, theta: Any, rho: Any, eta: Any, gamma: Any) -> Any:
    """SSVI total variance ``w(k, theta)`` (broadcasting)."""
    phi = eta / (theta**gamma * (1.0 + theta) ** (1.0 - gamma))
    return 0.5 * theta * (1.0 + rho * phi * k + np.sqrt((phi * k + rho) ** 2 + 1.0 - rho**2))


def _expiry_grid(date_pos: np.ndarray, tau: np.ndarray, n_dates: int) -> tuple[np.ndarray, np.ndarray]:
    """Column of each quote's expiry within its date (by increasing tau) and the (n_dates, n_expiries) taus."""
    tau_r = np.round(tau, 8)
    pairs, inverse = np.unique(np.stack([date_pos, tau_r], axis=1), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    pair_date = pairs[:, 0].astype(np.int64)
    first = np.searchsorted(pair_date, np.arange(n_dates))
    col = np.arange(len(pairs)) - first[pair_date]
    taus = np.full((n_dates, int(col.max()) + 1), np.nan)
    taus[pair_date, col] = pairs[:, 1]
    return col[inverse], taus


def fit(date: np.ndarray, tau: np.ndarray, k: np.ndarray, iv: np.ndarray, *, max_iter: int = 15) -> SSVIFit:
    """Fit one SSVI surface per distinct ``date`` to quotes ``(k, tau, iv)`` (one row each; use OTM quotes).

    Dates with fewer than ``MIN_QUOTES`` quotes, and dates whose fit failed (a non-finite parameter or RMSE), get NaN
    parameters: their rows have no SSVI value (``implied_vol`` gives NaN), which the evaluation counts and leaves out.
    """
    date, tau, k, iv = (np.asarray(a) for a in (date, tau, k, iv))
    ok = np.isfinite(tau) & np.isfinite(k) & np.isfinite(iv) & (tau > 0) & (iv > 0)
    date, tau, k, iv = date[ok], tau[ok], k[ok], iv[ok]
    dates, pos = np.unique(date, return_inverse=True)
    n = len(dates)
    if n == 0:
        nan = np.full(0, np.nan)
        return SSVIFit(dates, np.full((0, 1), np.nan), np.full((0, 1), np.nan), nan, nan, nan, nan)
    col, taus = _expiry_grid(pos, tau, n)
    valid = np.isfinite(taus)
    # Start: theta_j from the quote nearest the money on each expiry, made increasing.
    atm = np.full(taus.shape, np.nan)
    order = np.lexsort((np.abs(k), col, pos))
    first = np.ones(len(order), bool)
    first[1:] = (pos[order][1:] != pos[order][:-1]) | (col[order][1:] != col[order][:-1])
    sel = order[first]
    atm[pos[sel], col[sel]] = iv[sel] ** 2 * taus[pos[sel], col[sel]]
    atm = np.where(valid, atm, np.nan)
    start = np.fmax.accumulate(np.nan_to_num(atm, nan=0.0), axis=1)
    steps = np.diff(start, axis=1, prepend=0.0)
    steps = np.maximum(steps, 1e-3 * np.maximum(np.nanmax(atm, axis=1, keepdims=True), 1e-6))

    # Unconstrained parameters per date: [a, b, c, u_1..u_J] with rho = tanh(a), gamma = sigmoid(b) / 2,
    # eta = 2 sigmoid(c) / (1 + |rho|) and theta = cumsum(softplus(u)).
    p = np.zeros((n, 3 + taus.shape[1]))
    p[:, 0] = np.arctanh(-0.3)
    p[:, 3:] = np.log(np.expm1(steps))
    counts = np.bincount(pos, minlength=n)
    with np.errstate(all="ignore"):  # a failed date is found below and marked, not warned about row by row
        p = _levenberg_marquardt(_clip(p), pos, col, k, tau, iv, counts, max_iter=max_iter)
        theta, rho, eta, gamma = _params(p)
        w = total_variance(k, theta[pos, col], rho[pos], eta[pos], gamma[pos])
        sq = (np.sqrt(np.maximum(w, 1e-12) / tau) - iv) ** 2
        rmse = np.sqrt(np.bincount(pos, weights=sq, minlength=n) / counts)
    theta[~valid] = np.nan
    finite = np.isfinite(rmse) & np.isfinite(rho) & np.isfinite(eta) & np.isfinite(gamma) & (eta > 0)
    finite &= np.all(np.isfinite(theta) | ~valid, axis=1)
    bad = (counts < MIN_QUOTES) | ~finite
    for arr in (rho, eta, gamma, rmse):
        arr[bad] = np.nan
    theta[bad] = np.nan
    return SSVIFit(dates, taus, theta, rho, eta, gamma, rmse)


def _clip(p: np.ndarray) -> np.ndarray:
    """``p`` inside the parameter box (``LOWER``/``UPPER``, ``U_BOUNDS``); NaN stays NaN."""
    out = p.copy()
    out[:, :3] = np.clip(out[:, :3], LOWER, UPPER)
    out[:, 3:] = np.clip(out[:, 3:], *U_BOUNDS)
    return out


def _params(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(theta, rho, eta, gamma) from the unconstrained parameters (n_dates, 3 + n_expiries)."""
    rho = np.tanh(p[:, 0])
    gamma = 0.5 * expit(p[:, 1])
    eta = 2.0 * expit(p[:, 2]) / (1.0 + np.abs(rho))
    theta = np.cumsum(np.logaddexp(0.0, p[:, 3:]), axis=1)
    return theta, rho, eta, gamma


def _residuals(p: np.ndarray, pos: np.ndarray, col: np.ndarray, k: np.ndarray, tau: np.ndarray, iv: np.ndarray,
               jacobian: bool = False) -> Any:
    """Residuals in implied vol (n,), and with ``jacobian`` their derivatives (n, P) in the unconstrained
    parameters of each quote's own date (analytic: w's partials in theta, phi and rho, through the transforms)."""
    theta_all, rho_d, eta_d, gamma_d = _params(p)
    theta, rho, eta, gamma = theta_all[pos, col], rho_d[pos], eta_d[pos], gamma_d[pos]
    phi = eta / (theta**gamma * (1.0 + theta) ** (1.0 - gamma))
    z = phi * k + rho
    root = np.sqrt(z * z + 1.0 - rho * rho)
    w = 0.5 * theta * (1.0 + rho * phi * k + root)
    vol = np.sqrt(np.maximum(w, 1e-12) / tau)
    r = vol - iv
    if not jacobian:
        return r
    dr_dw = 0.5 / (vol * tau)
    dw_dphi = 0.5 * theta * k * (rho + z / root)
    dw_drho = 0.5 * theta * phi * k * (1.0 + 1.0 / root)
    dw_dtheta = w / theta + dw_dphi * phi * (-gamma / theta + (gamma - 1.0) / (1.0 + theta))
    dphi_deta = 1.0 / (theta**gamma * (1.0 + theta) ** (1.0 - gamma))  # phi / eta, without dividing by eta
    jac = np.empty((len(r), p.shape[1]))
    drho_da = 1.0 - rho * rho
    deta_drho = -eta * np.sign(rho) / (1.0 + np.abs(rho))
    jac[:, 0] = dr_dw * (dw_drho + dw_dphi * dphi_deta * deta_drho) * drho_da
    jac[:, 1] = dr_dw * dw_dphi * phi * np.log1p(1.0 / theta) * gamma * (1.0 - 2.0 * gamma)
    jac[:, 2] = dr_dw * dw_dphi * dphi_deta * eta * (1.0 - eta * (1.0 + np.abs(rho)) / 2.0)
    steps = expit(p[:, 3:])[pos]  # d theta_j / d u_m for m <= j
    below = col[:, None] >= np.arange(p.shape[1] - 3)[None, :]
    jac[:, 3:] = (dr_dw * dw_dtheta)[:, None] * steps * below
    return r, jac


def _levenberg_marquardt(p: np.ndarray, pos: np.ndarray, col: np.ndarray, k: np.ndarray, tau: np.ndarray,
                         iv: np.ndarray, counts: np.ndarray, *, max_iter: int) -> np.ndarray:
    """Every date's least squares at once: each residual depends on its own date's parameters only, so one
    vectorized pass gives every date's residuals and Jacobian, and each date takes its own damped Gauss-Newton
    step (a P x P solve per date, P = 3 + n_expiries)."""
    n, n_par = p.shape
    bounds = np.append(0, np.cumsum(counts))
    order = np.argsort(pos, kind="stable")
    pos, col, k, tau, iv = pos[order], col[order], k[order], tau[order], iv[order]  # each date's quotes together
    r, jac = _residuals(p, pos, col, k, tau, iv, jacobian=True)
    cost = np.bincount(pos, weights=r * r, minlength=n)
    lam = np.full(n, 1e-3)
    eye = np.eye(n_par)
    for _ in range(max_iter):
        step = np.zeros_like(p)
        for d in range(n):
            jd, rd = jac[bounds[d]:bounds[d + 1]], r[bounds[d]:bounds[d + 1]]
            a = jd.T @ jd
            g = jd.T @ rd
            if not (np.all(np.isfinite(a)) and np.all(np.isfinite(g))):
                continue  # a Jacobian that is not finite: no step (the date is marked failed if it stays so)
            try:
                step[d] = -np.linalg.solve(a + lam[d] * np.diag(np.diag(a)) + 1e-12 * eye, g)
            except np.linalg.LinAlgError:
                continue
        trial = _clip(p + np.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0))
        r_new = _residuals(trial, pos, col, k, tau, iv)
        cost_new = np.bincount(pos, weights=r_new * r_new, minlength=n)
        better = np.isfinite(cost_new) & (cost_new < cost)
        gain = np.where(better, (cost - cost_new) / np.maximum(cost, 1e-300), 0.0)
        p = np.where(better[:, None], trial, p)
        cost = np.where(better, cost_new, cost)
        lam = np.where(better, np.maximum(lam / 3.0, 1e-9), lam * 4.0)
        if np.all(better & (gain < 1e-9) | (lam > 1e6)):
            break
        r, jac = _residuals(p, pos, col, k, tau, iv, jacobian=True)
    return p


def theta_at(fit: SSVIFit, row: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """ATM total variance of surface ``row`` at time ``tau``: linear in time between expiries (0 at 0), growing
    like time beyond the last (flat ATM vol). Rows of ``fit`` per query, vectorized."""
    taus, theta = fit.taus[row], fit.theta[row]  # (n, n_expiries)
    n_exp = np.isfinite(taus).sum(axis=1)
    last = np.maximum(n_exp - 1, 0)
    ar = np.arange(len(row))
    t_last, th_last = taus[ar, last], theta[ar, last]
    t_pad = np.where(np.isfinite(taus), taus, np.inf)
    hi = np.minimum((t_pad < tau[:, None]).sum(axis=1), taus.shape[1] - 1)
    t_hi, th_hi = taus[ar, hi], theta[ar, hi]
    t_lo = np.where(hi > 0, taus[ar, np.maximum(hi - 1, 0)], 0.0)
    th_lo = np.where(hi > 0, theta[ar, np.maximum(hi - 1, 0)], 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        inner = th_lo + (tau - t_lo) / (t_hi - t_lo) * (th_hi - th_lo)
        beyond = th_last * tau / t_last
    return np.where(tau > t_last, beyond, inner)


def implied_vol(fit: SSVIFit, date: np.ndarray, k: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """The fitted surfaces' implied volatility at ``(k, tau)`` on each query's ``date`` (NaN for a date not fit)."""
    date, k, tau = np.asarray(date), np.asarray(k, dtype=np.float64), np.asarray(tau, dtype=np.float64)
    row = np.searchsorted(fit.dates, date)
    found = (row < len(fit.dates)) & (fit.dates[np.minimum(row, len(fit.dates) - 1)] == date) if len(fit.dates) \
        else np.zeros(len(date), bool)
    out = np.full(len(date), np.nan)
    if not found.any():
        return out
    r, kk, tt = row[found], k[found], np.maximum(tau[found], 1e-6)
    theta = theta_at(fit, r, tt)
    w = total_variance(kk, theta, fit.rho[r], fit.eta[r], fit.gamma[r])
    with np.errstate(invalid="ignore"):
        out[found] = np.sqrt(np.maximum(w, 0.0) / tt)
    return out


def otm(quotes: pd.DataFrame) -> np.ndarray:
    """Mask of out-of-the-money quotes (puts below the forward, calls at or above), or every quote of a date that
    has only one side."""
    call = quotes["option_type"].to_numpy() == "C"
    date = quotes["date_idx"].to_numpy()
    both = np.isin(date, np.intersect1d(date[call], date[~call]))
    return ~both | np.where(call, quotes["log_moneyness"].to_numpy() >= 0, quotes["log_moneyness"].to_numpy() < 0)


def ssvi_predictions(quotes: pd.DataFrame, rows: pd.DataFrame) -> tuple[np.ndarray, SSVIFit]:
    """SSVI IVs at ``rows`` (``info_idx``, ``log_moneyness``, ``tau``), each from the surface fit on its info date's
    OTM ``quotes`` (``date_idx``, ``option_type``, ``tau``, ``log_moneyness``, ``iv``)."""
    need = np.unique(rows["info_idx"].to_numpy())
    q = quotes[np.isin(quotes["date_idx"].to_numpy(), need)]
    q = q[otm(q)]
    f = fit(q["date_idx"].to_numpy(), q["tau"].to_numpy(np.float64), q["log_moneyness"].to_numpy(np.float64),
            q["iv"].to_numpy(np.float64))
    return implied_vol(f, rows["info_idx"].to_numpy(), rows["log_moneyness"].to_numpy(np.float64),
                       rows["tau"].to_numpy(np.float64)), f
