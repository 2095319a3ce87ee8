"""A cross-process file lock: the one guard around creating a shared SQLite store (Optuna's or MLflow's)."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(target: str | Path | None) -> Iterator[None]:
    """An exclusive lock on ``<target>.vforge-lock`` (no-op for None), held across processes on this machine.

    Two processes creating one fresh SQLite file at once race (optuna: ``table studies already
    exists``; MLflow: ``duplicate column name``): creation happens under this lock.
    """
    if target is None:
        yield
        return
    lock_path = Path(f"{target}.vforge-lock")  # not .lock: optuna's journal backend owns that name
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
