"""What a sweep prints: one line per trial and a progress bar with an ETA (on a terminal only).

A sweep job keeps its full log in its own folder (``<sweep dir>/<n>_<model>/train.log``); on the console it shows
only warnings and the data report of the sweep's first job (:func:`quiet_job_console`). The sweeper prints one
line per trial (:func:`trial_line`) and, on a terminal, a bar over the sweep's trials (:class:`SweepProgress`).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

ONCE_PER_SWEEP = "once_per_sweep"  # ``log.info(..., extra={ONCE_PER_SWEEP: True})``: shown by a sweep's first job only
# The sweeper's own loggers (with Hydra's basic launcher, jobs run in the sweeper's process and share its console)
SWEEPER_LOGGERS = ("vforge.sweeps.sweeper", "vforge.sweeps.automl", "vforge.sweeps.tracking", "hydra", "HYDRA")


def format_duration(seconds: float) -> str:
    """3725 -> '1:02:05', 65 -> '1:05'."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def eta_seconds(durations: list[float], n_left: int, seconds_left: float | None = None) -> float | None:
    """Time to the end of a sweep: the mean trial so far times the trials left, capped by a time budget's rest."""
    if not durations and seconds_left is None:
        return None
    estimate = sum(durations) / len(durations) * n_left if durations else float("inf")
    return min(estimate, seconds_left) if seconds_left is not None else estimate


class JobConsoleFilter(logging.Filter):
    """Let through a sweep job's warnings and errors, the sweeper's lines, and ``ONCE_PER_SWEEP`` records if
    ``first``; the job's own detail (epochs, results tables) stays in its log file."""

    def __init__(self, first: bool) -> None:
        super().__init__()
        self.first = first

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or record.name.startswith(SWEEPER_LOGGERS):
            return True
        return self.first and bool(getattr(record, ONCE_PER_SWEEP, False))


def quiet_job_console(first: bool) -> None:
    """Install :class:`JobConsoleFilter` on the console handlers of the root logger (Hydra sets them up anew for
    each job, so the filter lasts one job; file handlers keep everything)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            if not any(isinstance(f, JobConsoleFilter) for f in handler.filters):
                handler.addFilter(JobConsoleFilter(first))


def trial_line(number: int, state: str, params: dict[str, Any], value: float | None, *, epoch: int | None = None,
               reason: str = "", metric: str = "val RMSE", best: tuple[int, float] | None = None, done: int = 0, total: int | None = None,
               elapsed: float = 0.0, eta: float | None = None) -> str:
    """``trial 3  val RMSE 0.6123  lr=0.0003, d_block=128  | best trial 1 0.6050 | 4/8 2:10, ETA 2:05``."""
    shown = ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                      for k, v in params.items())
    rmse = f"{value:.4f}" if value is not None else "  -   "
    what = {"COMPLETE": f"{metric} {rmse}",
            "PRUNED": f"val RMSE {rmse} PRUNED at epoch {epoch if epoch is not None else '?'}"
                      + (f" ({reason})" if reason else ""),
            "FAIL": f"FAILED: {reason}"}.get(state, state)
    parts = [f"trial {number:3d}  {what}  [{shown}]"]
    if best is not None:
        parts.append(f"best trial {best[0]} {best[1]:.4f}")
    progress = f"{done}/{total}" if total else f"{done}"
    progress += f" in {format_duration(elapsed)}"
    if eta is not None and eta != float("inf"):
        progress += f", ETA {format_duration(eta)}"
    parts.append(progress)
    return " | ".join(parts)


class SweepProgress:
    """A bar over a sweep's trials on a terminal (stderr), with the ETA of :func:`eta_seconds`; nothing when piped.

    ``write(line)`` logs through the ``logging`` module with the bar cleared first, so lines and bar do not mix.
    """

    def __init__(self, total: int | None, *, label: str = "", seconds: float | None = None,
                 enabled: bool | None = None) -> None:
        self.total, self.label, self.budget = total, label, seconds
        self.start = time.monotonic()
        self.durations: list[float] = []
        self.show = sys.stderr.isatty() if enabled is None else enabled
        self.bar: Any = None
        if self.show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"{label}sweep", unit="trial", position=0, leave=False,
                            bar_format="{desc}: {n_fmt}/{total_fmt} trials |{bar:20}| {elapsed} {postfix}")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def eta(self, n_left: int) -> float | None:
        left = self.budget - self.elapsed if self.budget is not None else None
        return eta_seconds(self.durations, n_left, left)

    def trial_done(self, seconds: float, n_left: int) -> float | None:
        """Record a finished trial (``seconds`` long); return the sweep's ETA."""
        self.durations.append(seconds)
        eta = self.eta(n_left)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"ETA {format_duration(eta)}" if eta is not None else "", refresh=True)
        return eta

    def write(self, logger: logging.Logger, level: int, line: str) -> None:
        if self.bar is None:
            logger.log(level, "%s", line)
            return
        with self.bar.external_write_mode():
            logger.log(level, "%s", line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
