"""vforge.export: every format matches the eager model, and the folded preprocessing matches the training pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from vforge.export import FORMATS, Serving, export, load_serving
from vforge.train import train
from vforge.training.loop import predict

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# quantized: int8 weights and activations carry ~1/256 of each layer's range; over a few layers that stays well
# under a tenth of the target's spread (y_scale, one std of the change or level), i.e. a fraction of a vol point.
QUANTIZED_BOUND = 0.1


def export_cfg(run, fmt: str, *overrides: str) -> DictConfig:
    """conf/export.yaml with ``run``, ``format`` and a few timed repeats."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="export", overrides=[f"run={run}", f"format={fmt}", "latency_repeats=3", *overrides])


def test_export_mlp(make_cfg):
    cfg = make_cfg("model=mlp", "model.d_block=32", "model.n_blocks=2")
    train(cfg)
    run = cfg.output_dir
    serving, ckpt = load_serving(Path(run) / "model.pt")

    # The serving module on unscaled test rows = Dataset.to_level of the trained model's predictions.
    data = instantiate(cfg.data, _convert_="all")
    test = data.test
    x_raw = torch.as_tensor(test.x_num.double().numpy() * data.x_std + data.x_mean, dtype=torch.float32)
    with torch.inference_mode():
        got = serving(x_raw, torch.as_tensor(test.base, dtype=torch.float32)).double().numpy()
    want = data.to_level(predict(serving.model, test), test)
    assert np.abs(got - want).max() < 1e-5

    for fmt in FORMATS:
        report = export(export_cfg(run, fmt))
        assert report["path"].endswith(FORMATS[fmt]) and report["size_bytes"] > 0
        assert all(np.isfinite(report[k]) for k in ("latency_ms_1", "latency_ms_1024", "eager_latency_ms_1"))
        if fmt == "quantized":
            assert report["max_abs_diff_vol_pts"] / 100 < QUANTIZED_BOUND * ckpt["y_scale"], report
        else:
            assert report["max_abs_diff_vol_pts"] / 100 < 1e-5, report

    # The saved artifacts reproduce the pipeline too, on all test rows (a batch size unlike the traced one).
    base = torch.as_tensor(test.base, dtype=torch.float32)
    loaded = torch.jit.load(Path(run) / FORMATS["torchscript"])
    with torch.inference_mode():
        assert np.abs(loaded(x_raw, base).double().numpy() - want).max() < 1e-5
    session = onnxruntime.InferenceSession(Path(run) / FORMATS["onnx"], providers=["CPUExecutionProvider"])
    (iv,) = session.run(["iv"], {"x_num": x_raw.numpy(), "base": base.numpy()})
    assert np.abs(iv - want).max() < 1e-5

    ckpt["cat_cardinalities"] = [3]
    torch.save(ckpt, Path(run) / "cat.pt")
    with pytest.raises(ValueError, match="categorical features.*numeric-only"):
        export(export_cfg(Path(run) / "cat.pt", "onnx"))


def test_export_ft_transformer(make_cfg, tmp_path):
    cfg = make_cfg("model=ft_transformer", "model.d_block=16", "model.n_blocks=1", "model.attention_n_heads=2",
                   "data.target=level")
    train(cfg)
    y_scale = torch.load(Path(cfg.output_dir) / "model.pt", weights_only=False)["y_scale"]
    for fmt in FORMATS:
        report = export(export_cfg(cfg.output_dir, fmt, f"output={tmp_path / 'artifacts' / fmt}"))
        assert report["path"] == str(tmp_path / "artifacts" / fmt)
        bound = QUANTIZED_BOUND * y_scale if fmt == "quantized" else 1e-5
        assert report["max_abs_diff_vol_pts"] / 100 < bound, report


class Linear(torch.nn.Linear):
    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x_num)


@pytest.mark.parametrize("target", ["level", "change"])
def test_serving_folds_scaling(target):
    model = Linear(2, 3)
    serving = Serving(model, x_mean=np.array([1.0, -2.0]), x_std=np.array([2.0, 0.5]), y_center=0.2, y_scale=0.1,
                      target=target, output_index=1)
    x, base = torch.randn(5, 2), torch.full((5,), 0.3)
    want = model((x - torch.tensor([1.0, -2.0])) / torch.tensor([2.0, 0.5]))[:, 1] * 0.1 + 0.2
    if target == "change":
        torch.testing.assert_close(serving(x, base), want + 0.3)
    else:  # base is ignored, even when NaN
        torch.testing.assert_close(serving(x, torch.full((5,), float("nan"))), want)


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match="valid: onnx, torchscript, quantized"):
        export(export_cfg(tmp_path, "tflite"))
    with pytest.raises(FileNotFoundError, match="has no model.pt"):
        export(export_cfg(tmp_path, "onnx"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export(export_cfg(tmp_path / "nope", "onnx"))
