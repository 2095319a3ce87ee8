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


def split_metrics(prefix: str, pred: np.ndarray, true: np.ndarray, persistence: np.ndarray,
                  base: np.ndarray | None = None) -> dict[str, float]:
    """The model against the baselines a desk already has, like for like.

    Keys: ``{prefix}/rmse`` ... the model on all rows; ``{prefix}/baseline_rmse`` ... on all rows, the
    contract's previous IV, or the previous surface where the contract was not quoted (``base``);
    ``{prefix}/persistence_rmse`` ... the contract's previous IV on the rows where it exists, and
    ``{prefix}/matched_rmse`` ... the model on exactly those rows.
    """
    has_prev = np.isfinite(persistence)
    out = {f"{prefix}/{k}": v for k, v in iv_errors(pred, true).items()}
    if base is not None:
        out |= {f"{prefix}/baseline_{k}": v for k, v in iv_errors(base, true).items()}
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


def conformal_metrics(val_levels: np.ndarray, val_true: np.ndarray, test_levels: np.ndarray, test_true: np.ndarray,
                      intervals: list[tuple[int, int, float]]) -> dict[str, float]:
    """Conformalized quantile regression (Romano et al. 2019, arXiv 1905.03222), calibrated on validation.

    Each predicted interval is widened (or narrowed) by the offset that makes it cover the nominal share of
    validation rows; the test coverage of the calibrated intervals says whether that carries over in time.

    Keys: ``val/conformal_offset{pct}`` (vol points, add to both ends), ``test/conformal_coverage{pct}``,
    ``test/conformal_width{pct}``.
    """
    val_levels, test_levels = np.sort(val_levels, axis=1), np.sort(test_levels, axis=1)
    out = {}
    for lo, hi, nominal in intervals:
        pct = round(nominal * 100)
        scores = np.maximum(val_levels[:, lo] - val_true, val_true - val_levels[:, hi])
        n = len(scores)
        if n == 0 or len(test_true) == 0:
            continue
        offset = float(np.quantile(scores, min(1.0, np.ceil((n + 1) * nominal) / n), method="higher"))
        inside = (test_true >= test_levels[:, lo] - offset) & (test_true <= test_levels[:, hi] + offset)
        out[f"val/conformal_offset{pct}"] = offset * VOL_POINTS
        out[f"test/conformal_coverage{pct}"] = float(inside.mean())
        out[f"test/conformal_width{pct}"] = float(np.mean(test_levels[:, hi] - test_levels[:, lo] + 2 * offset) * VOL_POINTS)
    return out


def logged_metric_names(averaging: bool = False, coverages: tuple[float, ...] = ()) -> list[str]:
    """Every final metric a run logs (what ``optimized_metric`` may name).

    Args:
        averaging: weight averaging is on: ``val/raw_rmse`` (the raw weights) is logged too.
        coverages: nominal coverages of the quantile loss's intervals (0.9 -> ``val/coverage90``, ``val/width90``).
    """
    names = [f"{s}/{kind}{m}" for s in ("val", "test") for kind in ("", "baseline_", "persistence_", "matched_") for m in METRICS]
    if averaging:
        names.append("val/raw_rmse")
    names += [f"{s}/{k}{round(c * 100)}" for s in ("val", "test") for c in coverages for k in ("coverage", "width")]
    return names


def format_table(metrics: dict[str, float], rows: dict[str, tuple[int, int]]) -> str:
    """The end-of-run summary: the model beside the baseline, in vol points.

    Args:
        rows: split -> (all rows, rows whose contract was quoted on the previous date).
    """
    cols = "".join(f"{m.upper() if m != 'r2' else 'R2':>7}" for m in METRICS)
    lines = [f"{'':<26}{'model':^21}   {'baseline':^21}", f"{'split rows':<19}{'n':>7}{cols}   {cols}"]
    for s in ("val", "test"):
        g = lambda k, s=s: metrics.get(f"{s}/{k}", float("nan"))  # noqa: E731
        n_all, n_prev = rows[s]
        for label, n, model, base in (("all", n_all, "", "baseline_"), ("prev. quoted", n_prev, "matched_", "persistence_")):
            vals = ["".join(f"{g(prefix + m):>7.3f}" for m in METRICS) for prefix in (model, base)]
            lines.append(f"{s:<5} {label:<13}{n:>7}{vals[0]}   {vals[1]}")
    return "\n".join(lines) + (
        "\nerrors in vol points (IV x 100). baseline: the contract's IV on the previous quote date (persistence);"
        "\non 'all' rows, the previous surface stands in for contracts not quoted then."
    )
