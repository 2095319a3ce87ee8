"""MLflow tracking: one run per job, config as params and YAML, per-epoch and final metrics, the model."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from vforge.locks import file_lock

log = logging.getLogger(__name__)
RUN_FILE = "mlflow_run.json"  # in the run folder: the MLflow run this folder's training logs to
RUN_DIR_TAG = "vforge.run_dir"


def sqlite_file(tracking_uri: str) -> str | None:
    """The database file behind a ``sqlite:///`` tracking URI (None for other stores)."""
    path = tracking_uri[len("sqlite:///"):] if tracking_uri.startswith("sqlite:///") else ""
    return path if path and path != ":memory:" else None


@contextmanager
def unsynced_creation(db_file: str | None) -> Iterator[None]:
    """While a new SQLite store is created, SQLite does not wait for the disk after each commit.

    MLflow builds a fresh store by running its ~50 alembic migrations, each a transaction that SQLite syncs to
    disk: about 4 s of a first run's start, nearly all of it waiting for fsync. Connections opened inside this
    block use ``PRAGMA synchronous=OFF``; on leaving it the file is synced once and those connections go back to
    the setting they had, so the run's own logging keeps SQLite's durability. A no-op for an existing file or a
    store that is not a SQLite file.
    """
    if db_file is None or Path(db_file).exists():
        yield
        return
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    opened: list[tuple[sqlite3.Connection, int]] = []

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        if isinstance(dbapi_connection, sqlite3.Connection):
            level = dbapi_connection.execute("PRAGMA synchronous").fetchone()[0]
            dbapi_connection.execute("PRAGMA synchronous=OFF")
            opened.append((dbapi_connection, level))

    event.listen(Engine, "connect", on_connect)
    try:
        yield
    finally:
        event.remove(Engine, "connect", on_connect)
        for connection, level in opened:
            try:
                connection.execute(f"PRAGMA synchronous={int(level)}")
            except sqlite3.ProgrammingError:  # closed meanwhile
                pass
        if Path(db_file).exists():
            with open(db_file, "rb") as fh:
                os.fsync(fh.fileno())


def _run_exists(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False

# A run started while this is set becomes a child of that run (a sweep's trials, walk-forward's folds).
ENV_PARENT_RUN = "VFORGE_PARENT_RUN_ID"
# MLflow 3's UI opens an experiment in its GenAI view unless told it is for model training. Releases that read
# the experiment's kind from this tag follow it; later ones (3.17) take it from a per-browser switch instead,
# which the README's link sets (?workflowType=machine_learning).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment's artifacts go: ``<folder of the SQLite file>/mlruns`` for a SQLite store (MLflow's
    default would be ``./mlruns`` of whatever the working directory is), None (the server's choice) otherwise."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = tracking_uri[len("sqlite:///"):]
    if db in ("", ":memory:"):
        return None
    return (Path(db).resolve().parent / "mlruns").as_uri()


def experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name`` in ``client``'s store, created (artifacts beside a SQLite store, marked as a
    model-training experiment) if it does not exist yet."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri),
                                        tags=EXPERIMENT_TAGS)
    except MlflowException:  # another process created it in the meantime
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def run_tags(cfg: DictConfig) -> dict[str, str]:
    """What a training run is, as MLflow tags (a column each in the UI, and searchable: ``tags.data = 'synthetic'``):
    the model and data options, the target, the horizon and the evaluation protocol."""
    from hydra.core.hydra_config import HydraConfig

    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    path = cfg.data.get("path")
    return {"model": str(choices.get("model") or cfg.model.get("_target_", "?").rsplit(".", 1)[-1]),
            "data": str(choices.get("data") or (Path(str(path)).stem if path else "?")),
            "target": str(cfg.data.get("target")), "horizon": str(cfg.data.get("horizon")),
            "evaluation": str(OmegaConf.select(cfg, "evaluation.name", default="holdout"))}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become their string form."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            out[key] = v
    return out


class MLflowLogger:
    """A thin wrapper that owns one MLflow run.

    Args:
        tracking_uri: any MLflow tracking URI; the default config gives an embedded SQLite store.
        experiment: the experiment name; created on first use.
        log_model: log the trained model: its checkpoint as an artifact and the pyfunc model ``chain_model``.
        registered_model: register the pyfunc model, which predicts from raw chain rows, under this name.
    """

    def __init__(self, *, tracking_uri: str, experiment: str, log_model: bool = True,
                 registered_model: str | None = None) -> None:
        if registered_model and not log_model:
            raise ValueError(f"logger.registered_model={registered_model!r} needs logger.log_model=true: "
                             "a run that logs no model has nothing to register")
        self.registered_model = registered_model
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.log_model = log_model
        self.run_id: str | None = None
        self._logged_steps: dict[str, int] = {}

    def start(self, cfg: DictConfig, run_name: str, tags: dict[str, str] | None = None,
              run_id: str | None = None, run_dir: str | Path | None = None) -> str:
        """Start a new run, or with ``run_id`` continue that one (a resumed training): its params stay as they
        were and the resumed config is logged as ``config_resumed.yaml``.

        ``run_dir``: the run folder. The run id is written there (``mlflow_run.json``) as soon as the run exists,
        so a resume after a kill at any moment continues this run (:func:`folder_run_id`); RUNNING runs left by
        earlier processes in the same folder are closed as KILLED.
        """
        import mlflow  # costs ~1.5 s: only when tracking is on

        self._mlflow = mlflow
        mlflow.set_tracking_uri(self.tracking_uri)
        db_file = sqlite_file(self.tracking_uri)
        with file_lock(db_file), unsynced_creation(db_file):  # a fresh store is created (migrated) by one process
            client = mlflow.MlflowClient(self.tracking_uri)
            exp_id = experiment_id(client, self.experiment)
        self._logged_steps = {}
        if run_id and not _run_exists(client, run_id):
            log.warning("MLflow run %s is not in %s (deleted, or another store): starting a new run", run_id,
                        self.tracking_uri)
            run_id = None
        if run_id:
            self.run_id = mlflow.start_run(run_id=run_id).info.run_id
            # points logged before the kill are not logged again (the resumed epochs reproduce them exactly)
            self._logged_steps = {key: max(m.step for m in client.get_metric_history(run_id, key))
                                  for key in client.get_run(run_id).data.metrics}
            mlflow.set_tag("vforge.resumed", "true")
            mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config_resumed.yaml")
            log.info("MLflow run %s resumed at %s", self.run_id, self.tracking_uri)
            self._claim_folder(client, exp_id, run_dir)
            if not client.get_run(run_id).data.params:  # killed before its params were logged
                self._log_config(cfg)
            return self.run_id
        parent = os.environ.get(ENV_PARENT_RUN)
        tags = {**(tags or {}), **({RUN_DIR_TAG: str(Path(run_dir).resolve())} if run_dir else {})}
        # nested: the parent may be this process's active run (walk-forward's folds)
        run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags, parent_run_id=parent or None,
                               nested=bool(parent))
        self.run_id = run.info.run_id
        self._claim_folder(client, exp_id, run_dir)
        self._log_config(cfg)
        log.info("MLflow run %s in experiment %r at %s", self.run_id, self.experiment, self.tracking_uri)
        return self.run_id

    def _log_config(self, cfg: DictConfig) -> None:
        mlflow = self._mlflow
        container = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
        params = {k: str(v)[:6000] for k, v in flatten(container).items()}
        items = list(params.items())
        for lo in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            mlflow.log_params(dict(items[lo : lo + 100]))
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")

    def unfinished_folder_run(self, run_dir: str | Path) -> str | None:
        """The run this folder's training started in this store (``mlflow_run.json``) if it did not finish: a
        process killed before its first checkpoint is continued by ``trainer.resume=auto`` in the same folder."""
        try:
            saved = json.loads((Path(run_dir) / RUN_FILE).read_text())
        except (OSError, ValueError):
            return None
        if saved.get("tracking_uri") != self.tracking_uri:
            return None
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            run = MlflowClient(self.tracking_uri).get_run(saved["run_id"])
        except MlflowException:
            return None
        return None if run.info.status == "FINISHED" else run.info.run_id

    def _claim_folder(self, client: Any, exp_id: str, run_dir: str | Path | None) -> None:
        """Write this run's id into ``run_dir`` and close the folder's other RUNNING runs as KILLED."""
        if run_dir is None:
            return
        folder = Path(run_dir).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri,
                                   "experiment": self.experiment}))
        os.replace(tmp, folder / RUN_FILE)
        quoted = str(folder).replace("'", "\\'")
        stale = client.search_runs([exp_id], f"tags.`{RUN_DIR_TAG}` = '{quoted}' and attributes.status = "
                                   "'RUNNING'")
        for run in stale:
            if run.info.run_id != self.run_id:
                client.set_terminated(run.info.run_id, status="KILLED")
                log.warning("MLflow run %s of %s was left RUNNING by a process that is gone: closed as KILLED",
                            run.info.run_id, folder)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v == v}  # NaN: nothing to log
        if step is not None:
            clean = {k: v for k, v in clean.items() if step > self._logged_steps.get(k, -1)}
        if clean:
            self._mlflow.log_metrics(clean, step=step)

    def log_dict(self, d: dict, name: str) -> None:
        self._mlflow.log_dict(d, name)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), folder)

    def log_checkpoint(self, checkpoint: str | Path) -> None:
        """The trained model: its model.pt as ``model/model.pt`` and the pyfunc model ``chain_model`` (an MLflow
        logged model) that re-marks IVs from raw chain rows; registered under ``registered_model`` when named."""
        if not self.log_model:
            return
        self._mlflow.log_artifact(str(checkpoint), "model")
        from vforge.tracking.registry import log_chain_model

        uri = log_chain_model(checkpoint, self.registered_model)
        if self.registered_model:
            log.info("registered %s as MLflow model %r", uri, self.registered_model)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self._mlflow.end_run(status=status)
            self.run_id = None
