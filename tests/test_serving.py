"""vforge.serving: the model.pt schema (ModelBundle), loading a run, and serving raw chain rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from vforge.serving import ModelBundle, load_serving
from vforge.train import train


def test_model_pt_round_trips_and_old_files_still_load(make_cfg, tmp_path):
    cfg = make_cfg()
    train(cfg)
    path = Path(cfg.output_dir) / "model.pt"
    saved = torch.load(path, weights_only=False)
    assert isinstance(saved, dict)  # model.pt stays a plain dict of the bundle's fields
    bundle = ModelBundle.load(path)
    assert bundle.feature_names == list(cfg.data.features) and bundle.target == cfg.data.target
    # the last quote date's canonical rows travel with the model: one date, its quotes, with IVs
    surface = bundle.surface_frame()
    assert surface is not None and surface["quote_date"].nunique() == 1 and len(surface) > 10
    assert np.isfinite(surface["implied_volatility"]).all()

    bundle.save(tmp_path / "copy.pt")
    again = ModelBundle.load(tmp_path / "copy.pt")
    assert again.to_dict().keys() == bundle.to_dict().keys()
    pd.testing.assert_frame_equal(again.surface_frame(), surface)

    # a model.pt written before the surface (and the averaged-weights prefix) existed loads and predicts alike
    old = {k: v for k, v in saved.items() if k != "surface"}
    old["state_dict"] = {f"module.{k}": v for k, v in saved["state_dict"].items()}
    torch.save(old, tmp_path / "old.pt")
    x, base = torch.randn(7, len(bundle.feature_names)), torch.full((7,), 0.2)
    new_serving, _ = load_serving(path)
    old_serving, old_ckpt = load_serving(tmp_path / "old.pt")
    assert old_ckpt["surface"] is None
    with torch.inference_mode():
        torch.testing.assert_close(old_serving(x, base), new_serving(x, base), rtol=0, atol=0)
