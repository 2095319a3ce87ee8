"""``python -m vforge.export``: a trained run's model.pt -> one serving artifact (ONNX, TorchScript or int8) that
takes unscaled features and returns IV levels, checked against the eager torch module and timed."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from vforge import CONF_DIR
from vforge.data.target import VOL_POINTS
from vforge.serving import Serving, load_serving, median_ms, resolve_checkpoint

log = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "quantized": "model.quantized.pt"}
MAX_DIFF = 1e-5  # IV (decimal) tolerance of onnx/torchscript against eager torch


def sample_inputs(ckpt: dict, n: int, spread: float = 1.0, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random inputs at the features' real scale: mean + spread * std * N(0, 1); base uniform in [0.05, 0.8]."""
    g = torch.Generator().manual_seed(seed)
    mean, std = (torch.as_tensor(np.asarray(ckpt[k]), dtype=torch.float32) for k in ("x_mean", "x_std"))
    x = mean + spread * std * torch.randn(n, len(mean), generator=g)
    return x, 0.05 + 0.75 * torch.rand(n, generator=g)


def export_onnx(serving: Serving, example: tuple[Tensor, Tensor], path: Path, opset: int, meta: dict) -> Callable:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(f"format=onnx needs onnx and onnxruntime ({e}); install them with pip install -e '.[export]'") from e

    with warnings.catch_warnings():  # the legacy exporter's deprecation and tracer warnings: the parity check decides
        warnings.simplefilter("ignore")
        torch.onnx.export(serving, example, str(path), dynamo=False, opset_version=opset,
                          input_names=["x_num", "base"], output_names=["iv"],
                          dynamic_axes={"x_num": {0: "batch"}, "base": {0: "batch"}, "iv": {0: "batch"}})
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=json.dumps(v))
    onnx.save(proto, str(path))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # the same threads as the eager module it is timed against
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x, b: torch.from_numpy(session.run(None, {"x_num": x.numpy(), "base": b.numpy()})[0])


def export_torchscript(module: nn.Module, example: tuple[Tensor, Tensor], path: Path, meta: dict) -> Callable:
    with torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings flag shapes frozen into the graph; the parity check on other batch sizes catches those.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={"vforge.json": json.dumps(meta)})
    loaded = torch.jit.load(str(path))  # time and check what was saved, not what is in memory
    return lambda x, b: loaded(x, b)


def quantizable_linears(module: nn.Module, example: tuple[Tensor, ...]) -> list[str]:
    """Names of the ``nn.Linear`` modules that, on ``example``, only run through their own forward: those
    ``quantize_dynamic`` can swap for int8 ones. One whose weight another module reads (cross-attention slices its
    qkv weight) stays float."""
    linears = {name: m for name, m in module.named_modules() if type(m) is nn.Linear}
    called, touched, inside = set(), set(), set()

    class Probe(nn.Linear):
        def __getattr__(self, name: str) -> Any:
            if name in ("weight", "bias") and id(self) not in inside:
                touched.add(id(self))
            return super().__getattr__(name)

        def forward(self, x: Tensor) -> Tensor:
            called.add(id(self))
            inside.add(id(self))
            try:
                return super().forward(x)
            finally:
                inside.discard(id(self))

    for m in linears.values():
        m.__class__ = Probe
    try:
        with torch.no_grad():
            module(*example)
    finally:
        for m in linears.values():
            m.__class__ = nn.Linear
    return [name for name, m in linears.items() if id(m) in called and id(m) not in touched]



def export(cfg: DictConfig) -> dict:
    """Export ``cfg.run``'s model as ``cfg.format``; return the report (path, parity in vol points, size, latencies)."""
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r} is not an export format; valid: {', '.join(FORMATS)}")
    checkpoint = resolve_checkpoint(cfg.run, cfg.get("tracking_uri"))
    serving, ckpt = load_serving(checkpoint)
    out = Path(cfg.output) if cfg.output else checkpoint.parent / FORMATS[cfg.format]
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"feature_names": list(ckpt["feature_names"]), "target": ckpt["target"],
            "inputs": "x_num (batch, n_num) unscaled features in feature_names order; base (batch,) IV",
            "output": "iv (batch,) IV level (decimal)", "source": str(checkpoint)}
    example = sample_inputs(ckpt, 8)
    if cfg.format == "onnx":
        run = export_onnx(serving, example, out, cfg.opset, meta)
    elif cfg.format == "torchscript":
        run = export_torchscript(serving, example, out, meta)
    else:
        names = quantizable_linears(serving, example)
        n_linear = sum(type(m) is nn.Linear for m in serving.modules())
        log.info("quantizing %d of %d Linear layers to int8 (the rest are read by weight, not called)",
                 len(names), n_linear)
        with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices (torchao supersedes it)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            quantized = torch.ao.quantization.quantize_dynamic(
                serving, dict.fromkeys(names, torch.ao.quantization.default_dynamic_qconfig))
        meta["quantized_linear"] = f"{len(names)}/{n_linear}"
        run = export_torchscript(quantized, example, out, meta)

    diff = float("nan")
    if cfg.check:
        diffs = []
        for n, spread, seed in ((1024, 1.0, 1), (1024, 3.0, 2), (1, 1.0, 3)):  # real scale, wide tails, one row
            x, base = sample_inputs(ckpt, n, spread, seed)
            with torch.inference_mode():
                want, got = serving(x, base), run(x, base)
            if got.shape != want.shape:
                raise RuntimeError(f"exported {cfg.format} returns shape {tuple(got.shape)}, torch {tuple(want.shape)}")
            diffs.append(float((got.double() - want.double()).abs().max()))
        diff = max(diffs)
        if not np.isfinite(diff):
            raise RuntimeError(f"exported {cfg.format} at {out} returns non-finite values where torch does not")
        if cfg.format != "quantized" and diff > MAX_DIFF:
            raise RuntimeError(f"exported {cfg.format} at {out} differs from torch by {diff:.2e} IV > {MAX_DIFF:.0e}")

    report: dict = {"path": str(out), "format": cfg.format, "max_abs_diff_vol_pts": diff * VOL_POINTS,
                    "size_bytes": out.stat().st_size}
    if "quantized_linear" in meta:
        report["quantized_linear"] = meta["quantized_linear"]
    for n in (1, 1024):
        x, base = sample_inputs(ckpt, n, seed=4)
        with torch.inference_mode():
            report[f"latency_ms_{n}"] = median_ms(partial(run, x, base), cfg.latency_repeats, warmup=3)
            report[f"eager_latency_ms_{n}"] = median_ms(partial(serving, x, base), cfg.latency_repeats, warmup=3)
    log.info("exported %s -> %s (%s, %.1f KB); max |diff| vs torch %.2e vol pts; latency 1 row %.3f ms (eager "
             "%.3f), 1024 rows %.3f ms (eager %.3f)", checkpoint, out, cfg.format, report["size_bytes"] / 1024,
             report["max_abs_diff_vol_pts"], report["latency_ms_1"], report["eager_latency_ms_1"],
             report["latency_ms_1024"], report["eager_latency_ms_1024"])
    return report


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
