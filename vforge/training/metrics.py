"""IV error metrics in vol points (IV x 100), for the model and the persistence baseline."""

from __future__ import annotations

import numpy as np

VOL_POINTS = 100.0
METRICS = ("rmse", "mae", "r2")


def iv_errors(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """RMSE and MAE in vol points and R² of IV levels given as decimals."""
    err = (np.asarray(pred) - np.asarray(true)) * VOL_POINTS
    if err.size == 0:
        return {m: float("nan") for m in METRICS}
    ss_tot = float(np.sum((true - np.mean(true)) ** 2) * VOL_POINTS**2)
    return {
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "r2": 1.0 - float(np.sum(err**2)) / ss_tot if ss_tot > 0 else float("nan"),
    }


def split_metrics(prefix: str, pred: np.ndarray, true: np.ndarray, persistence: np.ndarray) -> dict[str, float]:
    """Model metrics on all rows, and model vs persistence on the rows where persistence exists.

    Keys: ``{prefix}/rmse`` ..., ``{prefix}/persistence_rmse`` ..., ``{prefix}/matched_rmse`` ...
    (the model on exactly the persistence rows, for a like-for-like comparison).
    """
    has_prev = np.isfinite(persistence)
    out = {f"{prefix}/{k}": v for k, v in iv_errors(pred, true).items()}
    out |= {f"{prefix}/persistence_{k}": v for k, v in iv_errors(persistence[has_prev], true[has_prev]).items()}
    out |= {f"{prefix}/matched_{k}": v for k, v in iv_errors(pred[has_prev], true[has_prev]).items()}
    return out


def interval_metrics(prefix: str, levels: np.ndarray, true: np.ndarray,
                     intervals: list[tuple[int, int, float]]) -> dict[str, float]:
    """Coverage and mean width (vol points) of predicted intervals.

    Args:
        levels: (n, n_quantiles) predicted IV quantiles; sorted per row first (monotone rearrangement), so
            crossing quantiles still give an interval.
        intervals: (i_lo, i_hi, nominal) column pairs, e.g. (0, 4, 0.9) for the 5% and 95% quantiles.

    Keys: ``{prefix}/coverage{pct}`` (share of true IVs inside; nominal ``pct`` %) and ``{prefix}/width{pct}``.
    """
    levels = np.sort(np.asarray(levels, dtype=np.float64), axis=1)
    out = {}
    for lo, hi, nominal in intervals:
        pct = round(nominal * 100)
        inside = (true >= levels[:, lo]) & (true <= levels[:, hi])
        out[f"{prefix}/coverage{pct}"] = float(inside.mean()) if len(true) else float("nan")
        out[f"{prefix}/width{pct}"] = float(np.mean(levels[:, hi] - levels[:, lo]) * VOL_POINTS) if len(true) else float("nan")
    return out


def logged_metric_names(averaging: bool = False, coverages: tuple[float, ...] = ()) -> list[str]:
    """Every final metric a run logs (what ``optimized_metric`` may name).

    Args:
        averaging: weight averaging is on: ``val/raw_rmse`` (the raw weights) is logged too.
        coverages: nominal coverages of the quantile loss's intervals (0.9 -> ``val/coverage90``, ``val/width90``).
    """
    names = [f"{s}/{kind}{m}" for s in ("val", "test") for kind in ("", "persistence_", "matched_") for m in METRICS]
    if averaging:
        names.append("val/raw_rmse")
    names += [f"{s}/{k}{round(c * 100)}" for s in ("val", "test") for c in coverages for k in ("coverage", "width")]
    return names


def format_table(metrics: dict[str, float], rows: dict[str, int]) -> str:
    """The end-of-run summary: model beside persistence, in vol points."""
    lines = [
        f"{'split':<6}{'rows':>8}  {'RMSE':>7}{'MAE':>7}{'R2':>7}   {'persistence RMSE':>17}{'MAE':>7}{'R2':>7}"
        f"   {'model on same rows RMSE':>24}",
    ]
    for s in ("val", "test"):
        g = lambda k, s=s: metrics.get(f"{s}/{k}", float("nan"))  # noqa: E731
        lines.append(
            f"{s:<6}{rows[s]:>8}  {g('rmse'):>7.3f}{g('mae'):>7.3f}{g('r2'):>7.3f}   "
            f"{g('persistence_rmse'):>17.3f}{g('persistence_mae'):>7.3f}{g('persistence_r2'):>7.3f}"
            f"   {g('matched_rmse'):>24.3f}"
        )
    return "\n".join(lines) + "\n(errors in vol points: IV x 100)"
