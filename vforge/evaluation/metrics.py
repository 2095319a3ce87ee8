"""IV error metrics in vol points (IV x 100), for the model and the persistence baseline."""

from __future__ import annotations

import numpy as np

from vforge.data.target import VOL_POINTS

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
    ``{prefix}/prev_quoted_rmse`` ... the model on exactly those rows.
    """
    has_prev = np.isfinite(persistence)
    out = {f"{prefix}/{k}": v for k, v in iv_errors(pred, true).items()}
    if base is not None:
        out |= {f"{prefix}/baseline_{k}": v for k, v in iv_errors(base, true).items()}
    out |= {f"{prefix}/persistence_{k}": v for k, v in iv_errors(persistence[has_prev], true[has_prev]).items()}
    out |= {f"{prefix}/prev_quoted_{k}": v for k, v in iv_errors(pred[has_prev], true[has_prev]).items()}
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


def logged_metric_names(averaging: bool = False, coverages: tuple[float, ...] = (),
                        walk_forward: bool = False) -> list[str]:
    """Every final metric a run logs (what ``optimized_metric`` may name).

    Args:
        averaging: weight averaging is on: ``val/raw_rmse`` (the raw weights) is logged too.
        coverages: nominal coverages of the quantile loss's intervals (0.9 -> ``val/coverage90``, ``val/width90``).
        walk_forward: ``evaluation=walk_forward``: the parent run's ``wf/*`` metrics and ``val/rmse``, the mean of
            the folds' validation RMSE (what a sweep selects on), instead.
    """
    kinds = ("", "baseline_", "persistence_", "prev_quoted_")
    extra = ("dm_stat", "dm_pvalue", "dates_beaten", "baseline_dm_stat", "baseline_dm_pvalue",
             "baseline_dates_beaten", "n_dates", "ssvi_rmse", "ssvi_prev_quoted_rmse", "ssvi_missing_rows")
    if walk_forward:
        return [f"wf/{k}{m}" for k in kinds for m in METRICS] + [f"wf/{k}" for k in extra] + ["wf/val_rmse", "val/rmse"]
    names = [f"{s}/{kind}{m}" for s in ("val", "test") for kind in kinds for m in METRICS]
    names += [f"{s}/{k}" for s in ("val", "test") for k in extra]
    if averaging:
        names.append("val/raw_rmse")
    names += [f"{s}/{k}{round(c * 100)}" for s in ("val", "test") for c in coverages for k in ("coverage", "width")]
    return names


# One meaning for each benchmark word: the data report, metrics.json, the results table, the leaderboard and the
# README all use these.
WORDS = {
    "persistence": "the contract's own IV on the previous quote date, on the rows that have one (prev. quoted)",
    "baseline": "persistence, else the previous date's surface at the contract's moneyness (every row)",
    "ssvi": "an SSVI surface (Gatheral & Jacquier 2014) fit to the previous date's quotes, at the row's moneyness",
}


def format_table(metrics: dict[str, float], rows: dict[str, tuple[int, int]]) -> str:
    """The end-of-run summary: the model beside its benchmark, the DM p-value and the dates won, in vol points.

    On the *all* rows the benchmark is the baseline, on the *prev. quoted* rows persistence (see ``WORDS``).

    Args:
        rows: split -> (all rows, rows whose contract was quoted on the previous date).
    """
    cols = "".join(f"{m.upper() if m != 'r2' else 'R2':>7}" for m in METRICS)
    lines = [f"{'':<26}{'model':^21}   {'benchmark':^21}  {'model vs benchmark':^16}  {'SSVI':>6}",
             f"{'split rows':<19}{'n':>7}{cols}   {cols}  {'DM p':>7} {'dates won':>9}  {'RMSE':>6}"]
    for s in rows:
        g = lambda k, s=s: metrics.get(f"{s}/{k}", float("nan"))  # noqa: E731
        n_all, n_prev = rows[s]
        for label, n, model, bench, dm, ssvi in (
                ("all", n_all, "", "baseline_", "baseline_", "ssvi_rmse"),
                ("prev. quoted", n_prev, "prev_quoted_", "persistence_", "", "ssvi_prev_quoted_rmse")):
            if n == 0:
                lines.append(f"{s:<5} {label:<13}{n:>7}   no contract was quoted on the previous date: "
                             "no persistence comparison is possible")
                continue
            vals = ["".join(f"{g(prefix + m):>7.3f}" for m in METRICS) for prefix in (model, bench)]
            share = g(dm + "dates_beaten")
            won = f"{share:>9.0%}" if share == share else f"{'-':>9}"
            fit = f"{g(ssvi):>6.3f}" if g(ssvi) == g(ssvi) else f"{'-':>6}"
            lines.append(f"{s:<5} {label:<13}{n:>7}{vals[0]}   {vals[1]}  {g(dm + 'dm_pvalue'):>7.3f} {won}  {fit}")
    missing = {s: int(metrics.get(f"{s}/ssvi_missing_rows", 0.0)) for s in rows}
    if any(missing.values()):
        lines.append("SSVI: no surface for " + ", ".join(f"{n:,} {s} rows" for s, n in missing.items() if n) +
                     " (their info date had < 5 quotes or its fit failed): left out of the SSVI column")
    return "\n".join(lines) + (
        "\nerrors in vol points (IV x 100). benchmark on 'all' rows: the baseline, " + WORDS["baseline"] +
        ";\non 'prev. quoted' rows: persistence, " + WORDS["persistence"] + ".\nSSVI: " + WORDS["ssvi"] +
        ".\nDM p: one-sided Diebold-Mariano p-value that the model's squared error is lower (per-date losses, "
        "Newey-West, HLN);\ndates won: share of quote dates on which the model's RMSE is below the benchmark's."
    )


def date_losses(true_change: np.ndarray, dates: np.ndarray, *pred_changes: np.ndarray) -> tuple[np.ndarray,
                                                                                              list[np.ndarray]]:
    """Per date (in date order): persistence's summed squared error (of predicting no change) and each predicted
    change's."""
    true = np.asarray(true_change)
    _, inv = np.unique(dates, return_inverse=True)
    return np.bincount(inv, true**2), [np.bincount(inv, (np.asarray(p) - true) ** 2) for p in pred_changes]


def per_date_ratio(pred_change: np.ndarray, true_change: np.ndarray, dates: np.ndarray) -> np.ndarray:
    """Per date: MSE of the predicted change over the MSE of predicting no change (persistence); one value a date."""
    persistence, (model,) = date_losses(true_change, dates, pred_change)
    return model / np.maximum(persistence, 1e-300)


def capped_weights(base: np.ndarray, cap: float) -> np.ndarray:
    """Per-date weights of the per-date persistence losses ``base``: 1, except a date above the ``cap`` quantile
    of them, which is scaled down to count as if at that quantile."""
    return np.minimum(1.0, np.quantile(base, cap) / np.maximum(base, 1e-300)) if len(base) else base


def capped_row_weights(true_change: np.ndarray, dates: np.ndarray, cap: float) -> np.ndarray:
    """Each row's weight in a pooled fit that ``capped_ratio`` would score: its date's ``capped_weights``."""
    _, inv = np.unique(dates, return_inverse=True)
    base, _ = date_losses(true_change, dates)
    return capped_weights(base, cap)[inv]


def capped_ratio(pred_change: np.ndarray, true_change: np.ndarray, dates: np.ndarray, cap: float) -> float:
    """Pooled MSE ratio to persistence with each date's weight capped: a date whose persistence loss is above the
    ``cap`` quantile of the dates' counts as if it were at that quantile (both losses scaled down alike).

    The test RMSE pools rows, so dates with large moves (where the predictable part of the change is) weigh most;
    a scale-free mean of per-date ratios instead lets calm dates, where any predicted change is noise, outvote them
    and over-shrinks. Capping keeps the pooled weighting and stops one jump from deciding."""
    base, (model,) = date_losses(true_change, dates, pred_change)
    if not len(base) or not base.sum() > 0:
        return float("nan")
    weight = capped_weights(base, cap)
    return float((model * weight).sum() / (base * weight).sum())


def score_se(pred_a: np.ndarray, pred_b: np.ndarray, true_change: np.ndarray, dates: np.ndarray,
             cap: float | None) -> float:
    """Standard error, across dates, of the difference of two predicted changes' scores (``capped_ratio`` with
    ``cap``; without, the mean of per-date ratios): each date's contribution to the difference taken as one draw,
    so the fewer the dates and the more they disagree, the larger it is."""
    base, (a, b) = date_losses(true_change, dates, pred_a, pred_b)
    n = len(base)
    if n < 2 or not base.sum() > 0:
        return float("inf")
    if cap is not None:
        weight = capped_weights(base, cap)
        part = (a - b) * weight / (base * weight).sum()  # the score difference is their sum
        return float(np.sqrt(n) * part.std(ddof=1))
    keep = base > 0
    return float(((a - b)[keep] / base[keep]).std(ddof=1) / np.sqrt(keep.sum())) if keep.sum() > 1 else float("inf")


def robust_score(ratios: np.ndarray, trim: float) -> float:
    """Trimmed mean of per-date ratios: the lowest and highest ``trim`` share of dates left out (the median when
    ``trim`` is 0.5)."""
    r = np.sort(np.asarray(ratios, dtype=np.float64))
    r = r[np.isfinite(r)]
    if not len(r):
        return float("nan")
    if trim >= 0.5:
        return float(np.median(r))
    cut = int(np.floor(trim * len(r)))
    return float(np.mean(r[cut : len(r) - cut]))
