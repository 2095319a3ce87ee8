"""Real chains through the same contract: each preset loads and trains one epoch.

The data live beside the repo in ../shared/data/real (or $VFORGE_SHARED_DATA/real); each test skips
with the path it looked for when the folder is absent. Nothing is copied into the repo.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from vforge.data.dataset import format_report
from vforge.train import train

SHARED = Path(os.environ.get("VFORGE_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


def need(folder: str) -> None:
    path = SHARED / "real" / folder
    if not path.exists():
        pytest.skip(f"real data folder {path} is absent (clone the repo beside shared/ or set VFORGE_SHARED_DATA)")


@pytest.fixture(autouse=True)
def shared_env(monkeypatch):
    monkeypatch.setenv("VFORGE_SHARED_DATA", str(SHARED.resolve()))


def check_trains(cfg) -> dict:
    metrics = train(cfg)
    assert math.isfinite(metrics["val/rmse"]) and math.isfinite(metrics["test/rmse"])
    return metrics


def test_spx_gatheral_surfaces_load_and_train(make_cfg):
    need("gatheral_style_frankieycy")
    cfg = make_cfg("data=spx_gatheral", "trainer.max_epochs=1", tiny=False)
    ds = instantiate(cfg.data, _convert_="all")
    assert ds.report["quote_dates"] == 5 and ds.report["dropped"]["drop_zero_bid"] > 0
    assert "rows dropped" in format_report(ds.report)
    # OTM convention: puts below the forward, calls above; IVs are the bid/ask mids.
    assert 0.05 < np.median(ds.test.iv) < 0.6
    check_trains(cfg)


def test_china50etf_quarter_loads_with_parity_forwards_and_trains(make_cfg):
    need("china50etf_case")
    cfg = make_cfg("data=china50etf", "data.start_date=2017-01-01", "data.end_date=2017-03-31", "trainer.max_epochs=1",
                   tiny=False)
    ds = instantiate(cfg.data, _convert_="all")
    rep = ds.report
    assert rep["dropped"]["drop_outside_dates"] > 250_000 and 50 < rep["quote_dates"] < 70
    # Parity forwards sit at the ETF's close (2.307 on 2017-01-03 per PROVENANCE.md), IVs are plausible.
    assert 0.08 < np.median(ds.train.iv) < 0.4
    assert np.isfinite(ds.test.persistence).mean() > 0.8
    check_trains(cfg)


@pytest.mark.slow
def test_china50etf_full_panel_trains(make_cfg):
    need("china50etf_case")
    metrics = check_trains(make_cfg("data=china50etf", tiny=False))
    assert metrics["test/persistence_rmse"] > 0
