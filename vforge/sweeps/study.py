"""Optuna studies shared by a sweeper and its jobs: storage URLs, safe creation, stale trials, trial counts.

The sweeper passes a job its trial through environment variables (``ENV_*``, set with
``hydra.job.env_set`` so nothing leaks from one job into the next); the job rebuilds the trial
with :func:`trial_from_env` and reports to it (vforge/sweeps/pruning.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from vforge.locks import file_lock

log = logging.getLogger(__name__)

ENV_STORAGE = "VFORGE_OPTUNA_STORAGE"
ENV_STUDY = "VFORGE_OPTUNA_STUDY"
ENV_TRIAL_ID = "VFORGE_OPTUNA_TRIAL_ID"
ENV_PRUNER = "VFORGE_OPTUNA_PRUNER"  # JSON of the pruner's config: a pruner is not kept in the storage

# user attributes the sweeper writes on each trial
ATTR_HOST, ATTR_PID, ATTR_STALE, ATTR_ERROR, ATTR_RETRY_OF = (
    "vforge:host", "vforge:pid", "vforge:stale", "vforge:error", "vforge:retry_of")
ATTR_MADE_FOR = "vforge:made_for"  # study attribute: the data, search space and overrides a study was made for


def _local_file(storage: str) -> Path | None:
    """The file behind a SQLite or journal URL (None for servers)."""
    if storage.startswith("sqlite:///"):
        path = storage[len("sqlite:///"):]
        return None if path in ("", ":memory:") else Path(path)
    if storage.startswith("journal:"):
        return Path(storage[len("journal:"):].removeprefix("//"))
    return None


_PG_LOCK_KEY = 0x7666_6F72_6765  # "vforge": one advisory lock per database, shared by every study in it
_LOCK_ENGINES: dict[str, Any] = {}
_SERVER_STORAGES: dict[tuple, optuna.storages.RDBStorage] = {}


@contextlib.contextmanager
def storage_lock(storage: str | None) -> Iterator[None]:
    """An exclusive lock shared by every process using ``storage``, wherever it runs.

    A file next to a SQLite or journal store (:func:`file_lock`); a session advisory lock
    (``pg_advisory_lock``) on a PostgreSQL server, so workers on other machines wait too and a
    worker that dies releases it with its connection; none for other servers.
    """
    if storage is None or not storage.startswith("postgresql"):
        with file_lock(_local_file(storage) if storage else None):
            yield
        return
    import sqlalchemy as sa

    if storage not in _LOCK_ENGINES:  # one small pool per server: a lock is then a round trip, not a connect
        _LOCK_ENGINES[storage] = sa.create_engine(storage, pool_size=1, pool_pre_ping=True)
    with _LOCK_ENGINES[storage].connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
        try:
            yield
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})


def open_storage(storage: str | None, *, heartbeat_interval: int | None = None,
                 grace_period: int | None = None) -> optuna.storages.BaseStorage | None:
    """A storage URL -> an Optuna storage; None stays None (in memory).

    ``sqlite:///x.db`` / ``postgresql://...`` -> RDBStorage (SQLite waits up to 60 s for a lock
    instead of failing when several workers write); ``journal:///path/x.log`` -> JournalStorage on
    a file, for many processes without a database server.
    """
    if storage is None:
        return None
    path = _local_file(storage)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if storage.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        if heartbeat_interval:
            log.warning("heartbeat_interval is ignored for a journal storage")
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    kwargs: dict[str, Any] = {}
    if storage.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    key = (storage, heartbeat_interval, grace_period)
    if key in _SERVER_STORAGES:  # a server's schema check costs dozens of round trips: once per process
        return _SERVER_STORAGES[key]
    with storage_lock(storage):  # two processes creating the tables at once would collide
        rdb = optuna.storages.RDBStorage(storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                         **kwargs)
    if storage.startswith("postgresql"):
        _SERVER_STORAGES[key] = rdb
    return rdb


def create_study(storage_url: str | None, study_name: str | None, directions: list[str], *,
                 sampler: optuna.samplers.BaseSampler | None = None, pruner: optuna.pruners.BasePruner | None = None, heartbeat_interval: int | None = None,
                 grace_period: int | None = None) -> optuna.Study:
    """Create the study or load it if it exists (a resumed or second sweep), once, under a file lock."""
    storage = open_storage(storage_url, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    with storage_lock(storage_url):
        study = optuna.create_study(storage=storage, study_name=study_name, directions=list(map(StudyDirection.__getitem__, map(str.upper, directions))),
                                    sampler=sampler, pruner=pruner, load_if_exists=True)
    if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in directions]:
        raise ValueError(
            f"study {study.study_name!r} in {storage_url} was created with directions "
            f"{[d.name.lower() for d in study.directions]}, not {directions}; use another study_name")
    return study


def check_made_for(study: optuna.Study, made_for: dict[str, Any], storage_url: str) -> None:
    """A study continues only the sweep it was made for: the same data, target, search space and fixed overrides.

    A new study records ``made_for`` (user attribute ``vforge:made_for``); a study made for another sweep is
    refused with the keys that differ, since its trials and best value answer another question.
    """
    from vforge.tracking.mlflow import flatten

    here = json.loads(json.dumps(made_for, sort_keys=True, default=str))
    saved = study.user_attrs.get(ATTR_MADE_FOR)
    if saved is None:
        if study.get_trials(deepcopy=False):
            log.warning("study %r in %s has trials but no record of what it was made for (an older vforge); "
                        "continuing it, and recording this sweep's", study.study_name, storage_url)
        study.set_user_attr(ATTR_MADE_FOR, here)
        return
    a, b = flatten(saved), flatten(here)
    diff = [f"{k}: {a.get(k, '(absent)')!r} there, {b.get(k, '(absent)')!r} here"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        raise ValueError(
            f"study {study.study_name!r} in {storage_url} was made for another sweep ({'; '.join(diff[:5])}"
            f"{f'; and {len(diff) - 5} more' if len(diff) > 5 else ''}): its trials do not answer this one. "
            "Start a new study with hydra.sweeper.study_name=<new name> (or another hydra.sweeper.storage, or "
            "storage=null for a fresh one), or continue this one with the same data, search space and overrides")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_stale_trials(study: optuna.Study, *, retry: bool = True) -> list[int]:
    """Mark RUNNING trials whose sweeper process is gone (killed sweep) as FAIL and stale.

    A trial is stale when it was started on this host by a process that no longer exists, or
    (RDB storages with ``heartbeat_interval``) when its heartbeat is older than the grace period.
    With ``retry`` its parameters are enqueued so the next trial tries them again. Stale trials do
    not count toward ``n_trials``. Returns the stale trial numbers.
    """
    stale: list[int] = []
    storage = study._storage
    # heartbeats: the storage's own staleness test (optuna.storages.fail_stale_trials applies the same one, but a
    # trial can no longer be tagged once it is failed, so tag first, then fail)
    stale_ids = set(storage._get_stale_trial_ids(study._study_id)) if getattr(  # type: ignore[attr-defined]
        storage, "get_heartbeat_interval", lambda: None)() else set()
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        dead = t.user_attrs.get(ATTR_HOST) == host and not _pid_alive(int(t.user_attrs.get(ATTR_PID, 0)) or 0)
        if t._trial_id in stale_ids or dead:
            try:
                storage.set_trial_user_attr(t._trial_id, ATTR_STALE, True)
                study.tell(t.number, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker got there first (or the trial just finished)
            stale.append(t.number)
    if retry:
        for t in study.get_trials(deepcopy=False):
            if t.number in stale and t.params:
                study.enqueue_trial(t.params, user_attrs={ATTR_RETRY_OF: t.number}, skip_if_exists=False)
    if stale:
        log.warning("trials %s were left running by a sweep that is gone: marked failed (stale)%s", stale,
                    ", their params queued again" if retry else "")
    return stale


def counted(trial: FrozenTrial) -> bool:
    """Whether a trial counts toward ``n_trials``: done, running or queued, but not stale."""
    return not trial.user_attrs.get(ATTR_STALE, False)


def n_counted(study: optuna.Study) -> int:
    return sum(counted(t) for t in study.get_trials(deepcopy=False))


def claim(trial: optuna.Trial) -> None:
    """Stamp a freshly asked trial with this process, so a later sweep can tell it is stale."""
    trial.set_user_attr(ATTR_HOST, socket.gethostname())
    trial.set_user_attr(ATTR_PID, os.getpid())


def job_env(storage_url: str, study_name: str, trial: optuna.Trial, pruner_cfg: dict | None) -> dict[str, str]:
    """What a job needs to rebuild its trial."""
    env = {ENV_STORAGE: storage_url, ENV_STUDY: study_name, ENV_TRIAL_ID: str(trial._trial_id)}
    if pruner_cfg:
        env[ENV_PRUNER] = json.dumps(pruner_cfg)
    return env


def trial_from_env(environ: dict[str, str] | None = None) -> optuna.Trial | None:
    """In a job: the Optuna trial the sweeper asked for, rebuilt from the environment; None outside sweeps."""
    env = os.environ if environ is None else environ
    if not (env.get(ENV_STORAGE) and env.get(ENV_STUDY) and env.get(ENV_TRIAL_ID)):
        return None
    pruner = None
    if env.get(ENV_PRUNER):
        from hydra.utils import instantiate

        pruner = instantiate(json.loads(env[ENV_PRUNER]))
    storage = open_storage(env[ENV_STORAGE])
    assert storage is not None  # ENV_STORAGE is set
    study = optuna.load_study(study_name=env[ENV_STUDY], storage=storage, pruner=pruner)
    trial = optuna.Trial(study, int(env[ENV_TRIAL_ID]))
    return trial
