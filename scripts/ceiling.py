"""How much of a market's daily IV change is predictable: ``python scripts/ceiling.py [--seeds 7 8 9] [--heston 1 2 3]``.

The embedded market (``data=synthetic``) knows each quote's noise-free model IV (the generator's ``model_iv``), and
so does a ``scripts/heston_panel.py`` panel (its truth file: each quote's model price, inverted here), so
persistence's error on the previously quoted test rows splits into the true change of the model IV and the quote
noise of the two dates. Each daily change of a Heston IV is driven by the variance's shock, which is correlated with
the spot's: the day's spot move (``spot_ret_1d_vol``, in units of the previous ATM vol) is the only information a
model has about it. This script fits that relation as flexibly as the data allow: for each bucket of tenor and of
moneyness in standard deviations (``moneyness_std``) a least-squares fit of the true change on ``1, x, x^2`` with ``x``
the spot move, and reports, as RMSE ratios to persistence on the test block's previously quoted rows (market quotes):

- ``buckets fit before test``: the fit on the training and validation dates, applied to the test dates: what a model
  that knew the model IVs of the past, and had only the spot move, could reach;
- ``oracle on test``: the fit on the test dates themselves (look-ahead): no model with these inputs can do better
  on average, however flexible;
- ``+ prev. noise``: that oracle also knowing the previous quote's noise exactly (today's noise regressed on it):
  the most a model could gain by telling the previous quote's noise from its neighbours (``prev_iv_resid``).

The rest of persistence's error is the variance's own shock and the quotes' noise. On the default market the noise
(tick rounding) moves slowly with the price, so it is mostly shared by the two dates (``corr`` below) and removing
the previous quote's noise gains little; a Heston panel's noisy mid is drawn afresh each day (``corr`` 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from hydra.utils import instantiate

from vforge.data.iv import forward, implied_vol
from vforge.data.synthetic import generated
from vforge.data.target import VOL_POINTS

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402
import heston_panel  # noqa: E402

KEY = ["expiry", "strike", "option_type"]
TENOR_EDGES = [0, 0.05, 0.1, 0.2, 0.4, 0.7, np.inf]  # years
MONEYNESS_EDGES = [-np.inf, -2, -1, -0.5, 0, 0.5, 1, 2, np.inf]  # standard deviations (moneyness_std, scaled)


def true_changes(split, names: list[str], model_iv: pd.DataFrame) -> pd.DataFrame:
    """The previously quoted rows of ``split`` with the model IV of their target and info dates (``true_t``,
    ``true_p``), the quotes (``iv``, ``persistence``), the spot move ``x`` and their bucket."""
    rows = split.rows[["target_date", "info_date", *KEY, "tau"]].copy()
    rows["iv"], rows["persistence"] = split.iv, split.persistence
    rows["x"] = split.x_num[:, names.index("spot_ret_1d_vol")].numpy()
    m = split.x_num[:, names.index("moneyness_std")].numpy()
    for date, col in (("target_date", "true_t"), ("info_date", "true_p")):
        rows = rows.merge(model_iv.rename(columns={"quote_date": date, "model_iv": col}), on=[date, *KEY], how="left")
    rows["bucket"] = (np.digitize(rows["tau"], TENOR_EDGES) * 100 + np.digitize(m, MONEYNESS_EDGES))
    keep = np.isfinite(rows[["persistence", "true_t", "true_p"]].to_numpy()).all(axis=1)
    return rows[keep].reset_index(drop=True)


def bucket_fit(rows: pd.DataFrame) -> dict[int, np.ndarray]:
    """Per bucket, the least-squares coefficients of the true change on ``1, x, x^2``."""
    out = {}
    for bucket, g in rows.groupby("bucket"):
        design = np.column_stack([np.ones(len(g)), g["x"], g["x"] ** 2])
        out[int(bucket)] = np.linalg.lstsq(design, g["true_t"] - g["true_p"], rcond=None)[0]
    return out


def bucket_predict(coef: dict[int, np.ndarray], rows: pd.DataFrame) -> np.ndarray:
    design = np.column_stack([np.ones(len(rows)), rows["x"], rows["x"] ** 2])
    table = np.stack([coef.get(int(b), np.zeros(3)) for b in rows["bucket"]])
    return np.einsum("ij,ij->i", design, table)


def heston_model_iv(path: Path) -> pd.DataFrame:
    """The noise-free IV of every quote of a ``scripts/heston_panel.py`` panel: its model price (the panel's truth
    file) inverted at the loader's forward, the out-of-the-money option's IV given to both types at a strike (as
    ``itm_from_otm`` gives the quotes; the model prices obey put-call parity)."""
    frame = pd.read_csv(path).merge(pd.read_parquet(heston_panel.truth_path(path)), on=["quote_date", *KEY])
    for col in ("quote_date", "expiry"):
        frame[col] = pd.to_datetime(frame[col])
    tau = (frame["expiry"] - frame["quote_date"]).dt.days.to_numpy() / 365.0
    fwd = forward(frame["underlying_price"].to_numpy(), tau, frame["rate"].to_numpy(),
                  frame["dividend_yield"].to_numpy())
    is_call = (frame["option_type"] == "C").to_numpy()
    frame["model_iv"], _ = implied_vol(frame["model_price"].to_numpy(), fwd, frame["strike"].to_numpy(), tau,
                                       frame["rate"].to_numpy(), is_call)
    otm = frame[is_call == (frame["strike"].to_numpy() >= fwd)]
    return frame[["quote_date", *KEY]].merge(otm[["quote_date", "expiry", "strike", "model_iv"]],
                                             on=["quote_date", "expiry", "strike"])


def ceiling(overrides: list[str], model_iv: pd.DataFrame) -> dict[str, float]:
    """The decomposition and the ratios on the data ``overrides`` compose, whose quotes' model IVs are ``model_iv``."""
    cfg = accuracy.compose_cfg(overrides, Path("outputs/ceiling"), "ceiling")
    data = instantiate(cfg.data, _convert_="all")
    names = list(data.feature_names)
    past = pd.concat([true_changes(s, names, model_iv) for s in (data.train, data.val)], ignore_index=True)
    test = true_changes(data.test, names, model_iv)
    change = test["true_t"] - test["true_p"]
    quote_change = test["iv"] - test["persistence"]
    noise_t, noise_p = test["iv"] - test["true_t"], test["persistence"] - test["true_p"]

    def ms(v: pd.Series | np.ndarray) -> float:
        return float(np.mean(np.square(v))) * VOL_POINTS**2

    def ratio(pred: np.ndarray) -> float:
        return float(np.sqrt(ms(quote_change - pred) / ms(quote_change)))

    oracle = bucket_predict(bucket_fit(test), test)
    # and knowing the previous quote's noise too: today's quote noise regressed on it (one slope; the rest is new)
    slope = float(np.dot(noise_t, noise_p) / np.dot(noise_p, noise_p))
    return {"rows": len(test), "persistence_rmse": float(np.sqrt(ms(quote_change))),
            "true_change_rmse": float(np.sqrt(ms(change))), "noise_rmse": float(np.sqrt(ms(noise_t))),
            "noise_corr": float(np.corrcoef(noise_t, noise_p)[0, 1]),
            "before_test": ratio(bucket_predict(bucket_fit(past), test)), "oracle": ratio(oracle),
            "oracle_noise": ratio(oracle + (slope - 1.0) * noise_p)}


def synthetic_case(seed: int | None) -> tuple[str, list[str], pd.DataFrame]:
    overrides = [] if seed is None else [f"data.seed={seed}"]
    cfg = accuracy.compose_cfg(overrides, Path("outputs/ceiling"), "ceiling")
    return f"seed {cfg.data.seed}", overrides, generated(**cfg.data)[["quote_date", *KEY, "model_iv"]]


def heston_case(variant: int) -> tuple[str, list[str], pd.DataFrame]:
    cache = Path(accuracy.compose_cfg(["data=chain"], Path("outputs/ceiling"), "ceiling").data.cache_dir)
    path = heston_panel.write(variant, cache / "heston_panel", truth=True)
    return f"heston {variant}", ["data=chain", f"data.path={path}"], heston_model_iv(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="*", default=[], help="data.seed values of the default market")
    p.add_argument("--heston", type=int, nargs="*", default=[], choices=list(heston_panel.VARIANTS),
                   help="scripts/heston_panel.py variants (held out: written with their truth if missing)")
    args = p.parse_args()
    cases = [(synthetic_case, s) for s in args.seeds] + [(heston_case, v) for v in args.heston]
    print(f"{'market':>10}{'rows':>8}{'persistence':>13}{'true change':>13}{'quote noise':>13}{'corr':>7}"
          f"{'buckets fit before test':>25}{'oracle on test':>16}{'+ prev. noise':>15}")
    for make, arg in cases or [(synthetic_case, None)]:
        name, overrides, model_iv = make(arg)
        r = ceiling(overrides, model_iv)
        print(f"{name:>10}{r['rows']:>8}{r['persistence_rmse']:>13.3f}{r['true_change_rmse']:>13.3f}"
              f"{r['noise_rmse']:>13.3f}{r['noise_corr']:>7.2f}{r['before_test']:>24.3f}x{r['oracle']:>15.3f}x"
              f"{r['oracle_noise']:>14.3f}x", flush=True)


if __name__ == "__main__":
    main()
