"""Shared fixtures: configs composed from the real conf/, tiny data, one MLflow store per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
# A small market: ~40 quote dates, a few thousand quotes, generated in about a second.
TINY_DATA = ["data.n_days=40", "data.listing.n_monthlies=4", "data.listing.n_weeklies=2"]

torch.set_num_threads(1)  # 2-core machines: parallel BLAS in tiny tests costs more than it gives


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One synthetic-data cache for the whole session, so each market is generated once."""
    path = tmp_path_factory.mktemp("vforge-cache")
    os.environ["VFORGE_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """One SQLite MLflow store per session: its first use costs ~2 s of migrations."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (tests/postgres.py); ``postgres.url()`` is a fresh database."""
    from .postgres import PostgresServer, find_bin_dir

    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: run scripts/install_postgres.sh "
                    "(the Debian package postgresql)")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install -e '.[postgres]'")
    server = PostgresServer(bin_dir).start()
    yield server
    server.stop()


@pytest.fixture
def make_cfg(tmp_path, cache_dir):
    """``make_cfg(*overrides)`` composes conf/train.yaml with fast, tiny, untracked defaults."""

    def _make(*overrides: str, tiny: bool = True) -> DictConfig:
        # no plots unless a test asks (evaluation.plots=true): matplotlib would add a second or two to every run
        base = ["trainer=fast", "logger=none", "evaluation.plots=false", *(TINY_DATA if tiny else [])]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*base, *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve as in a real run
        with open_dict(cfg):
            del cfg.hydra
            cfg.output_dir = str(tmp_path / "out")
            if "cache_dir" in cfg.get("data", {}):
                cfg.data.cache_dir = str(cache_dir)
        return cfg

    return _make
