"""Implied-vol inverter throughput on 1e6 options, and its worst round-trip error on a wide grid.

    python scripts/bench_iv.py [--n 1000000] [--repeat 3]

Options: ln(K/F) uniform in [-1, 1], 1 day to 3 years, vol 5% to 100%, half calls. The figure
is rows/s of ``vforge.data.iv.implied_vol`` (best of ``--repeat``), single process.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from vforge.data.iv import OK, bs_price, implied_vol


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    n = args.n
    fwd, rate = 100.0, 0.02
    strike = fwd * np.exp(rng.uniform(-1.0, 1.0, n))
    tau = rng.uniform(1 / 365, 3.0, n)
    vol = rng.uniform(0.05, 1.0, n)
    call = rng.random(n) < 0.5
    price = bs_price(fwd, strike, tau, vol, rate, call)
    best = np.inf
    for _ in range(args.repeat):
        start = time.perf_counter()
        sigma, reason = implied_vol(price, fwd, strike, tau, rate, call)
        best = min(best, time.perf_counter() - start)
    ok = reason == OK
    otm = np.where(call, strike >= fwd, strike <= fwd) & (price > np.finfo(float).tiny)  # subnormal prices: ~2 digits
    print(f"{n:,} options: {best:.2f} s, {n / best:,.0f} rows/s; inverted {ok.mean():.2%} "
          "(the rest: deep ITM prices whose time value is lost to rounding, price == intrinsic)")
    print(f"  max |error| OTM {np.abs(sigma - vol)[ok & otm].max():.1e}; ITM {np.abs(sigma - vol)[ok & ~otm].max():.1e} "
          "(ITM: the price's own rounding, eps * price / vega)")

    # Wide grid: ln(K/F) in [-3, 3], 1 day to 5 years, vol 1% to 300%, OTM calls and puts.
    m, t, v = (a.ravel() for a in np.meshgrid(np.linspace(-3, 3, 61), [1 / 365, 7 / 365, 30 / 365, 0.25, 1, 2, 5],
                                              [0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 1, 2, 3], indexing="ij"))
    c = m >= 0
    p = bs_price(fwd, fwd * np.exp(m), t, v, rate, c)
    sigma, reason = implied_vol(p, fwd, fwd * np.exp(m), t, rate, c)
    good = (reason == OK) & (p > np.finfo(float).tiny)
    print(f"OTM grid: {good.sum()} of {len(p)} prices representable (others underflow); "
          f"worst round-trip |error| {np.abs(sigma - v)[good].max():.1e}")


if __name__ == "__main__":
    main()
