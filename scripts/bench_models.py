"""Every model of conf/model/ on the default data: training samples/s, memory, inference latency, val RMSE; and the
reference implementations of rtdl_revisiting_models (MLP, ResNet, FT-Transformer) with the same hyperparameters.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_models.py [--models mlp ft_transformer] [--steps 300] [--threads 2]

Needs the benchmark-only extra ``rtdl_revisiting_models`` for the reference rows (skipped without it).

Each model trains ``--steps`` steps (batch ``--batch-size``, AdamW lr ``--lr``, MSE on the configured target: the
work of one step of ``vforge.training.loop.fit``). A model with a reference trains in ``--rounds`` chunks that
alternate with the reference's chunks, so a slow moment of the shared machine hits both alike; the ratio column is
ours / reference of the median chunk time (below 1: ours is faster). After training: val RMSE in vol points (the
accuracy both reached in the same steps), single-row latency (median of 200 eval calls) and batch latency (4096
rows, median of 5). Memory is the peak bytes of tensors a training step holds, counted exactly rather than read
from the shared process' RSS: parameters, gradients and AdamW's two moments (4x the parameter bytes) plus the
activations autograd saves for the backward pass (unique storages, via ``saved_tensors_hooks``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402
from torch import nn  # noqa: E402

from vforge.models.base import Model  # noqa: E402
from vforge.training.loop import val_rmse  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
REFERENCED = ("mlp", "resnet", "ft_transformer")


def compose_cfg(model: str, data_overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={model}", "logger=none", *data_overrides])
    with open_dict(cfg):
        cfg.data.cache_dir = os.environ.get("VFORGE_CACHE_DIR", str(Path.home() / ".cache" / "vforge"))
    return cfg


class _Reference(Model):
    """An rtdl_revisiting_models model behind vforge's ``forward(x_num, x_cat)``; a vforge ``Model``, so the bench
    trains it through the same ``forward_train`` call as ours."""

    def __init__(self, model: nn.Module, tokens: bool) -> None:
        super().__init__()
        self.model, self.tokens = model, tokens

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x_num, x_cat) if self.tokens else self.model(x_num)


def reference(name: str, hp: DictConfig, n_num: int, cat_cardinalities: list[int]) -> nn.Module | None:
    """The rtdl_revisiting_models model with our YAML's hyperparameters, or None if the package is absent."""
    try:
        import rtdl_revisiting_models as rtdl
    except ImportError:
        return None
    if cat_cardinalities and name != "ft_transformer":
        return None  # rtdl's MLP/ResNet take one flat input; compare on numeric-only data
    if name == "mlp":
        return _Reference(rtdl.MLP(d_in=n_num, d_out=1, n_blocks=hp.n_blocks, d_block=hp.d_block,
                                   dropout=hp.dropout), tokens=False)
    if name == "resnet":
        return _Reference(rtdl.ResNet(d_in=n_num, d_out=1, n_blocks=hp.n_blocks, d_block=hp.d_block,
                                      d_hidden_multiplier=hp.d_hidden_multiplier, dropout1=hp.dropout1,
                                      dropout2=hp.dropout2), tokens=False)
    return _Reference(rtdl.FTTransformer(
        n_cont_features=n_num, cat_cardinalities=cat_cardinalities, d_out=1, n_blocks=hp.n_blocks,
        d_block=hp.d_block, attention_n_heads=hp.attention_n_heads, attention_dropout=hp.attention_dropout,
        ffn_d_hidden=None, ffn_d_hidden_multiplier=hp.ffn_d_hidden_multiplier, ffn_dropout=hp.ffn_dropout,
        residual_dropout=hp.residual_dropout), tokens=True)


class Trainer:
    """One model, its optimizer and its own random batches; ``run(n)`` trains n steps and returns the seconds."""

    def __init__(self, model: nn.Module, data, batch_size: int, lr: float, seed: int) -> None:
        self.model, self.data, self.batch_size = model, data, batch_size
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)
        self.generator = torch.Generator().manual_seed(seed)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        train = self.data.train
        idx = torch.randint(len(train), (self.batch_size,), generator=self.generator)
        return train.x_num[idx], None if train.x_cat is None else train.x_cat[idx], train.y[idx]

    def _loss(self, x_num, x_cat, y) -> torch.Tensor:
        out, aux = self.model.forward_train(x_num, x_cat)  # vforge.models.base.Model
        loss = (out[:, 0] - y).square().mean()
        return loss + aux if aux is not None else loss

    def run(self, steps: int) -> float:
        self.model.train()
        start = time.perf_counter()
        for _ in range(steps):
            loss = self._loss(*self._batch())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
        return time.perf_counter() - start

    def memory_mb(self) -> float:
        """Parameters + gradients + AdamW moments + the activations saved for backward, in MB."""
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
            return t

        self.model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self._loss(*self._batch())
        del loss
        param_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return (4 * param_bytes + sum(storages.values())) / 2**20


@torch.inference_mode()
def latency_ms(model: nn.Module, data, rows: int, repeats: int) -> float:
    model.eval()
    val = data.val
    x_num = val.x_num[:rows]
    x_cat = None if val.x_cat is None else val.x_cat[:rows]
    model(x_num, x_cat)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x_num, x_cat)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def bench(name: str, args, data, cfg: DictConfig) -> list[dict]:
    torch.manual_seed(args.seed)
    ours = instantiate(cfg.model, n_num=data.n_num, cat_cardinalities=data.cat_cardinalities, d_out=1)
    torch.manual_seed(args.seed)
    ref = reference(name, cfg.model, data.n_num, data.cat_cardinalities) if name in REFERENCED else None
    entries = [("vforge", ours)] + ([("rtdl", ref)] if ref is not None else [])
    trainers = {label: Trainer(m, data, args.batch_size, args.lr, args.seed) for label, m in entries}
    for trainer in trainers.values():
        trainer.run(args.warmup)
    chunks: dict[str, list[float]] = {label: [] for label in trainers}
    per_round = max(args.steps // args.rounds, 1)
    for _ in range(args.rounds):  # interleaved: ours, reference, ours, reference, ...
        for label, trainer in trainers.items():
            chunks[label].append(trainer.run(per_round))
    rows = []
    for label, model in entries:
        seconds = sum(chunks[label])
        rows.append({
            "model": name, "impl": label, "params": sum(p.numel() for p in model.parameters()),
            "samples_per_s": per_round * args.rounds * args.batch_size / seconds,
            "median_chunk_s": statistics.median(chunks[label]),
            "memory_mb": trainers[label].memory_mb(),
            "latency_1_ms": latency_ms(model, data, 1, 200),
            "latency_4096_ms": latency_ms(model, data, 4096, 5),
            "val_rmse": val_rmse(model, data, 8192),
        })
    if len(rows) == 2:
        ratio = rows[0]["median_chunk_s"] / rows[1]["median_chunk_s"]
        rows[0]["time_ratio_vs_rtdl"] = rows[1]["time_ratio_vs_rtdl"] = ratio
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, help="model config names (default: all)")
    parser.add_argument("--steps", type=int, default=300, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=6, help="chunks the steps are split into, interleaved")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", nargs="*", default=[], help="data overrides, e.g. data.n_days=120")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models or sorted(p.stem for p in (CONF / "model").glob("*.yaml"))

    data = instantiate(compose_cfg(names[0], args.data).data, _convert_="all")
    print(f"data: {len(data.train)} train rows x {data.n_num} numeric features, {len(data.val)} val rows; "
          f"{args.steps} steps of {args.batch_size}, {args.threads} threads\n")
    header = (f"{'model':22s} {'impl':6s} {'params':>9s} {'samples/s':>10s} {'vs rtdl':>8s} {'mem MB':>7s} "
              f"{'1 row ms':>9s} {'4096 ms':>8s} {'val RMSE':>9s}")
    print(header)
    print("-" * len(header))
    rows = []
    for name in names:
        for row in bench(name, args, data, compose_cfg(name, args.data)):
            rows.append(row)
            ratio = f"{row['time_ratio_vs_rtdl']:.2f}x" if "time_ratio_vs_rtdl" in row and row["impl"] == "vforge" \
                else ""
            print(f"{row['model']:22s} {row['impl']:6s} {row['params']:9d} {row['samples_per_s']:10.0f} {ratio:>8s} "
                  f"{row['memory_mb']:7.1f} {row['latency_1_ms']:9.2f} {row['latency_4096_ms']:8.1f} "
                  f"{row['val_rmse']:9.3f}", flush=True)
    print("\nvs rtdl: ours / reference median time per chunk of steps (below 1: ours is faster); "
          "val RMSE in vol points after the same steps.")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
