"""Training throughput (samples/s) of fp32 vs bf16 autocast vs torch.compile, on the default data.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_precision.py [--models mlp ft_transformer] [--rounds 5]

Each round times every variant for ``--steps`` training steps (forward, loss, backward, AdamW step; the same
work as one step of ``vforge.training.loop.fit``) in turn, so a slow moment of a shared machine hits all
variants alike; the report gives each variant's median samples/s and its median ratio to fp32 within
a round. Compilation and the first steps are excluded by warm-up steps. ``--variants fp32 loop`` compares the
real loop (``fit``) with a bare step: the loop's overhead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from vforge.training.loop import fit  # noqa: E402
from vforge.training.losses import MSE  # noqa: E402
from vforge.training.optim import param_groups  # noqa: E402

CONF = str(Path(__file__).resolve().parents[1] / "conf")
VARIANTS = ("fp32", "bf16", "compile", "compile+bf16", "loop")


def load(model_name: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={model_name}", "logger=none"])
    with open_dict(cfg):
        cfg.data.cache_dir = os.environ.get("VFORGE_CACHE_DIR", str(Path.home() / ".cache" / "vforge"))
    return cfg


def make_step(cfg, data, variant: str):
    torch.manual_seed(0)
    model = instantiate(cfg.model, n_num=data.n_num, cat_cardinalities=data.cat_cardinalities, d_out=1)
    optimizer = instantiate(cfg.optimizer)(param_groups(model))
    forward = torch.compile(model) if variant.startswith("compile") else model
    bf16 = variant.endswith("bf16")
    loss_fn, train = MSE(), data.train
    g = torch.Generator().manual_seed(0)
    bs = cfg.trainer.batch_size

    def step() -> None:
        idx = torch.randint(len(train), (bs,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = forward(train.x_num[idx], None if train.x_cat is None else train.x_cat[idx])
        loss = loss_fn(pred.float(), train.y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step, bs


def make_fit(cfg, data, steps: int):
    """One epoch of the real loop (``fit``, callbacks off) over ``steps`` batches: its samples/s against the bare
    step's measures what the loop adds (batch assembly, the per-step loss record, validation of 512 rows)."""
    torch.manual_seed(0)
    model = instantiate(cfg.model, n_num=data.n_num, cat_cardinalities=data.cat_cardinalities, d_out=1)
    optimizer = instantiate(cfg.optimizer)(param_groups(model))
    bs = cfg.trainer.batch_size
    rows = lambda s, n: dataclasses.replace(s, x_num=s.x_num[:n], y=s.y[:n], iv=s.iv[:n], base=s.base[:n],  # noqa: E731
                                            persistence=s.persistence[:n])
    small = dataclasses.replace(data, train=rows(data.train, steps * bs), val=rows(data.val, 512))

    def step() -> None:  # called `steps` times per round: run the epoch once, on the first call of a round
        step.calls += 1
        if step.calls % steps == 1 or steps == 1:
            fit(model, small, loss_fn=MSE(), optimizer=optimizer, max_epochs=1, batch_size=bs, grad_clip=1.0,
                generator=torch.Generator().manual_seed(0))

    step.calls = 0
    return step, bs


def bench(model_name: str, rounds: int, steps: int, warmup: int, variants: tuple[str, ...]) -> None:
    cfg = load(model_name)
    data = instantiate(cfg.data, _convert_="all")
    fns = {}
    for v in variants:
        t0 = time.perf_counter()
        fns[v] = make_fit(cfg, data, steps) if v == "loop" else make_step(cfg, data, v)
        for _ in range(warmup if v != "loop" else steps):
            fns[v][0]()
        print(f"  {model_name:<15} {v:<13} warm-up ({warmup} steps, incl. compile) {time.perf_counter() - t0:6.1f} s",
              flush=True)
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            step, bs = fns[v]
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            rates[v].append(steps * bs / (time.perf_counter() - t0))
    print(f"\n{model_name}: samples/s (median of {rounds} rounds x {steps} steps, batch {cfg.trainer.batch_size}), "
          f"ratio to fp32 (median of per-round ratios)")
    for v in variants:
        ratio = statistics.median(r / f for r, f in zip(rates[v], rates["fp32"]))
        print(f"  {v:<13} {statistics.median(rates[v]):10.0f}   x{ratio:.2f}")
    print(flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mlp", "ft_transformer"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS[:4]), choices=VARIANTS,
                   help="loop: the whole fit() in fp32, to measure the loop's overhead over a bare fp32 step")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = tuple(dict.fromkeys(["fp32", *args.variants]))  # fp32 is the reference
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"bf16 {'supported' if torch.backends.mkldnn.is_available() else 'unknown'} on this CPU")
    for m in args.models:
        bench(m, args.rounds, args.steps, args.warmup, variants)


if __name__ == "__main__":
    main()
