"""Implied-vol inverter throughput on 1e6 options, and its worst round-trip error on a wide grid.

    python scripts/bench_iv.py [--n 1000000] [--repeat 3] [--vs py_vollib_vectorized]

Options: ln(K/F) uniform in [-1, 1], 1 day to 3 years, vol 5% to 100%, half calls. The figure
is rows/s of ``vforge.data.iv.implied_vol`` (best of ``--repeat``), single process. With
``--vs py_vollib_vectorized`` (``pip install -e ".[bench]"``) both invert the same prices in turns,
``--repeat`` rounds, and the ratio of each round is printed: on shared cores only a ratio from
interleaved runs in one process means anything.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from vforge.data.iv import OK, REASONS, bs_price, implied_vol


def timed(fn):
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--vs", choices=["py_vollib_vectorized"], default=None,
                        help="time a reference inverter interleaved with ours and print the ratio")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    n = args.n
    fwd, rate = 100.0, 0.02
    strike = fwd * np.exp(rng.uniform(-1.0, 1.0, n))
    tau = rng.uniform(1 / 365, 3.0, n)
    vol = rng.uniform(0.05, 1.0, n)
    call = rng.random(n) < 0.5
    price = bs_price(fwd, strike, tau, vol, rate, call)

    def ours(rows=slice(None)):
        return implied_vol(price[rows], fwd, strike[rows], tau[rows], rate, call[rows])

    _, first, _ = timed(lambda: implied_vol(price[:1], fwd, strike[:1], tau[:1], rate, call[:1]))
    print(f"first call: {first:.2f} s (numba: compiles once per machine, then loads from __pycache__)")
    if args.vs:
        compare(args, ours, price, fwd, strike, tau, rate, call, vol)
        return

    best = np.inf
    for _ in range(args.repeat):
        (sigma, reason), seconds, _ = timed(ours)
        best = min(best, seconds)
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


def compare(args, ours, price, fwd, strike, tau, rate, call, vol) -> None:
    """Ours and py_vollib_vectorized in turns on the same prices; rows/s, ratio per round, errors."""
    import py_vollib_vectorized

    spot = fwd * np.exp(-rate * tau)  # no dividends: its BSM forward is then ours
    flag = np.where(call, "c", "p")

    def ref(rows=slice(None)):
        return py_vollib_vectorized.vectorized_implied_volatility(
            price[rows], spot[rows], strike[rows], tau[rows], rate, flag[rows], q=0.0, model="black_scholes_merton",
            return_as="numpy", on_error="ignore")

    _, first, _ = timed(ref)
    print(f"py_vollib_vectorized first call: {first:.2f} s")
    # Each round alternates the two on 4 slices of the rows, so that a change of load on the shared
    # cores falls on both alike; CPU seconds are the process's, all threads.
    n, ratios = len(price), []
    slices = np.array_split(np.arange(n), 4)
    for i in range(args.repeat):
        ref_s, our_s = np.zeros(2), np.zeros(2)  # wall, CPU
        for rows in slices:
            ref_s += timed(lambda rows=rows: ref(rows))[1:]
            our_s += timed(lambda rows=rows: ours(rows))[1:]
        ratios.append(ref_s[0] / our_s[0])
        print(f"round {i + 1}: vforge {n / our_s[0]:,.0f} rows/s ({our_s[1]:.2f} CPU s), py_vollib_vectorized "
              f"{n / ref_s[0]:,.0f} rows/s ({ref_s[1]:.2f} CPU s), ratio {ratios[-1]:.2f}x")
    print(f"vforge / py_vollib_vectorized rows/s: {min(ratios):.2f}x .. {max(ratios):.2f}x "
          f"(median {np.median(ratios):.2f}x over {len(ratios)} interleaved rounds)")
    ref_sigma, (sigma, reason) = ref(slice(None)), ours(slice(None))
    intrinsic = np.where(call, np.maximum(fwd - strike, 0.0), np.maximum(strike - fwd, 0.0)) * np.exp(-rate * tau)
    well_posed = price - intrinsic > 1e-8 * spot
    for name, s in (("vforge", sigma), ("py_vollib_vectorized", ref_sigma)):
        err = np.abs(s - vol)[well_posed]
        print(f"  {name}: max |error| {np.nanmax(err):.1e} on the {well_posed.sum():,} well-posed rows "
              f"(time value above 1e-8 of spot), {np.isnan(err).sum()} of them not inverted")
    codes, counts = np.unique(reason[~well_posed], return_counts=True)
    print("  vforge on the other rows: " + ", ".join(f"{c:,} {REASONS[k]}" for k, c in zip(codes, counts)))


if __name__ == "__main__":
    main()
