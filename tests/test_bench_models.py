"""scripts/bench_models.py: the rtdl reference and vforge's models train through the same call (it rotted once when
the model base class gained ``forward_train`` and the reference wrapper did not)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_models as B  # noqa: E402


@pytest.mark.parametrize("name", ["ft_transformer"])
def test_the_bench_trains_ours_and_the_reference_alike(make_cfg, name):
    pytest.importorskip("rtdl_revisiting_models", reason="the benchmark-only extra rtdl_revisiting_models")
    cfg = make_cfg(f"model={name}")
    data = instantiate(cfg.data, _convert_="all")
    args = argparse.Namespace(seed=0, batch_size=32, lr=1e-3, warmup=1, steps=2, rounds=2)
    rows = B.bench(name, args, data, cfg)
    assert [r["impl"] for r in rows] == ["vforge", "rtdl"]
    ours, ref = rows
    assert ours["params"] == ref["params"]  # same hyperparameters, same architecture size
    assert ours["time_ratio_vs_rtdl"] > 0 and all(r["val_rmse"] > 0 for r in rows)
