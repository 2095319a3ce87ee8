"""Crash-safe checkpoints: ``last.pt`` (everything needed to resume) and ``best.pt`` (the best weights),
written atomically every epoch, and the lookup behind ``trainer.resume=auto|<path>``."""

from __future__ import annotations

import logging
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vforge.training.callbacks import Callback

if TYPE_CHECKING:
    from vforge.training.state import FitState, Stateful

log = logging.getLogger(__name__)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``: a crash at any moment
    leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def remove_stale_temp(folder: str | Path) -> list[Path]:
    """Delete the temp files ``atomic_save`` left in ``folder`` when its process was killed mid-write (one
    training writes a run folder at a time, so at fit start every one is stale)."""
    stale = sorted(Path(folder).glob(".*.pt.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temp file(s) left by a killed write in %s", len(stale), folder)
    return stale


def rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),  # noqa: NPY002 (legacy global RNG, saved as is)
            "python": random.getstate(),
            "generator": None if generator is None else generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    random.setstate(state["python"])
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(state: FitState, callbacks: Sequence[Stateful] | None = None) -> dict[str, Any]:
    """Everything the loop needs to continue after ``state.epoch``: the state of ``callbacks`` (default: all of
    the fit's, ``state.callbacks``) among it."""
    callbacks = state.callbacks if callbacks is None else callbacks
    return {
        "epoch": state.epoch, "step": state.step, "history": state.history, "stop": state.stop,
        "best_epoch": state.best_epoch, "best_value": state.best_value,
        "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
        "scheduler": None if state.scheduler is None else state.scheduler.state_dict(),
        "grad_scaler": None if state.grad_scaler is None else state.grad_scaler.state_dict(),
        "callbacks": {cb.name: cb.state_dict() for cb in callbacks},
        "rng": rng_state(state.generator), "finished": False,
    }


def restore(state: FitState, callbacks: Sequence[Stateful], ckpt: dict[str, Any]) -> None:
    """Load a ``last.pt`` dict into a freshly built state (after ``on_fit_start``)."""
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if state.scheduler is not None and ckpt["scheduler"] is not None:
        state.scheduler.load_state_dict(ckpt["scheduler"])
    if state.grad_scaler is not None and ckpt["grad_scaler"] is not None:
        state.grad_scaler.load_state_dict(ckpt["grad_scaler"])
    for cb in callbacks:
        if cb.name in ckpt["callbacks"]:
            cb.load_state_dict(ckpt["callbacks"][cb.name])
    state.epoch, state.step, state.history = ckpt["epoch"] + 1, ckpt["step"], list(ckpt["history"])
    state.stop, state.best_epoch, state.best_value = ckpt["stop"], ckpt["best_epoch"], ckpt["best_value"]
    set_rng_state(ckpt["rng"], state.generator)


class Checkpoint(Callback):
    """Write ``<dir>/last.pt`` after every epoch and ``<dir>/best.pt`` when validation improved.

    ``last.pt`` holds the state of every callback of the fit (``state.callbacks``: built-in, config and user
    callbacks alike), or of ``callbacks`` when given. ``extra`` (e.g. the MLflow run id) is stored in both. ``last.pt`` is marked ``finished`` at the end of the
    fit, so ``trainer.resume=auto`` does not pick a run that completed.
    """

    def __init__(self, dirpath: str | Path, callbacks: Sequence[Stateful] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        self.dir = Path(dirpath)
        self.callbacks = callbacks  # whose state goes into last.pt; None: all of the fit's
        self.extra = extra or {}

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.dir / "best.pt"

    def on_fit_start(self, state: FitState) -> None:
        remove_stale_temp(self.dir)

    def on_epoch_end(self, state: FitState) -> None:
        if state.improved:
            atomic_save({"epoch": state.epoch, "model": state.eval_model.state_dict(), "metrics": state.metrics,
                         **self.extra}, self.best)
        atomic_save(training_state(state, self.callbacks) | self.extra, self.last)

    def on_fit_end(self, state: FitState) -> None:
        if self.last.exists():
            ckpt = torch.load(self.last, weights_only=False)
            ckpt["finished"] = True
            atomic_save(ckpt, self.last)


def find_resume(resume: str | None, output_dir: str | Path, run_name: str | None = None,
                siblings: bool = True) -> Path | None:
    """The checkpoint ``trainer.resume`` points at.

    ``null``: none. A path: that file (or ``<dir>/checkpoints/last.pt`` for a run folder); it must exist.
    ``auto``: ``<output_dir>/checkpoints/last.pt`` if present, else (with ``siblings``; off for sweep trials,
    which must not pick up each other's runs) the newest unfinished ``last.pt`` of a sibling run folder
    (``outputs/runs/*``) with the same ``run_name``; none found: start fresh.
    """
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if path.is_dir():
            path = path / "checkpoints" / "last.pt"
        if not path.is_file():
            raise FileNotFoundError(f"trainer.resume={resume!r}: no checkpoint at {path}; pass a last.pt, a run "
                                    "folder that holds checkpoints/last.pt, or trainer.resume=auto")
        return path
    own = Path(output_dir) / "checkpoints" / "last.pt"
    if own.is_file():
        return own
    if not siblings:
        return None
    candidates = sorted(Path(output_dir).parent.glob("*/checkpoints/last.pt"), key=lambda p: p.stat().st_mtime,
                        reverse=True)
    for path in candidates:
        try:
            ckpt = torch.load(path, weights_only=False, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - an unreadable file is skipped, with a word
            log.warning("resume=auto: skipping unreadable %s (%s)", path, e)
            continue
        if not ckpt.get("finished") and (run_name is None or ckpt.get("run_name") == run_name):
            return path
    log.info("resume=auto: no unfinished checkpoint found; starting fresh")
    return None


def check_compatible(ckpt: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """A checkpoint resumes only the model and loss it was trained with: say which group differs."""
    saved = ckpt.get("config") or {}
    for group in ("model", "loss"):
        if group in saved and saved[group] != config.get(group):
            raise ValueError(f"trainer.resume: {path} was trained with {group}={saved[group]}, this run has "
                             f"{group}={config.get(group)}; resume with the same {group} or set trainer.resume=null")


@dataclass
class Resume:
    """Where a training run stands before it starts: the checkpoint it resumes (``path``/``ckpt``, None for a fresh
    run) and the folders that follow from it."""

    out_dir: Path
    path: Path | None = None
    ckpt: dict[str, Any] | None = None
    setting: str | None = None  # trainer.resume

    @classmethod
    def find(cls, setting: str | None, out_dir: Path, *, run_name: str | None, siblings: bool,
             config: dict[str, Any], device: torch.device, broadcast: Callable[[Any], Any] = lambda x: x,
             is_main: bool = True) -> Resume:
        """``trainer.resume`` resolved (:func:`find_resume`), its checkpoint loaded and checked against ``config``
        (:func:`check_compatible`); ``out_dir`` made and cleared of a killed write's temp files. ``broadcast``
        gives every DDP rank rank 0's choice."""
        path = broadcast(find_resume(setting, out_dir, run_name, siblings=siblings))
        ckpt = torch.load(path, weights_only=False, map_location=device) if path else None
        if ckpt:
            check_compatible(ckpt, config, path)
            log.info("resuming from %s after epoch %d", path, ckpt["epoch"])
        out_dir.mkdir(parents=True, exist_ok=True)
        if is_main:
            remove_stale_temp(out_dir)  # a model.pt write killed midway
        return cls(out_dir, path, ckpt, setting)

    @property
    def ckpt_dir(self) -> Path:
        """Where last.pt / best.pt go: next to the checkpoint resumed from, else in this run's folder."""
        return self.path.parent if self.path else self.out_dir / "checkpoints"

    @property
    def run_dir(self) -> Path:
        """The run folder this training belongs to: the resumed checkpoint's, else this job's."""
        return self.path.parent.parent if self.path else self.out_dir

    def mlflow_run_id(self, logger: Any) -> str | None:
        """The MLflow run to continue: the checkpoint's, else (``trainer.resume`` set) one the run folder started and
        did not finish, else None (a new run)."""
        if self.ckpt:
            return self.ckpt.get("mlflow_run_id")
        return logger.unfinished_folder_run(self.run_dir) if self.setting else None
