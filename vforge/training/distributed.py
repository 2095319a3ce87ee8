"""One model on several processes: ``torchrun ... -m vforge.train trainer.strategy=ddp``.

``trainer.strategy=single`` (the default) is one process. ``ddp`` joins the process group torchrun set up
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT`` in the environment; gloo on CPU, NCCL on
GPU) and wraps the model in ``DistributedDataParallel``. Every rank draws the same permutation (the same
seeded generator) and steps through its share of each global batch of ``trainer.batch_size`` rows, so
the gradient DDP averages is the global batch's and a run matches a single process with the same batch
size. Validation runs on every rank (it is in memory and cheap), which keeps early stopping in step
without messages; rank 0 alone logs to MLflow, writes checkpoints and files, and prints.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class Single:
    """One process, one device: what every hook does when nothing is distributed."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def shard(self, idx: Tensor) -> Tensor:
        """This rank's rows of a global batch."""
        return idx

    def mean(self, value: float) -> float:
        """The mean of ``value`` over ranks."""
        return value

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return obj

    def check_agree(self, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class DDP(Single):
    """DistributedDataParallel over the process group torchrun launched."""

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            raise ValueError("trainer.strategy=ddp needs the process group torchrun sets up; launch with "
                             "`torchrun --standalone --nproc_per_node=<n> -m vforge.train trainer.strategy=ddp ...` "
                             "or set trainer.strategy=single")
        self.dist = dist
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        cuda = device.type == "cuda"
        self.device = torch.device("cuda", self.local_rank) if cuda else device  # one GPU per process
        if not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        if not self.is_main:  # one voice: warnings and errors only from the other ranks
            logging.getLogger().setLevel(logging.WARNING)
        log.info("DDP: %d processes (%s)", self.world_size, dist.get_backend())

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def shard(self, idx: Tensor) -> Tensor:
        # contiguous, near-equal parts: equal parts make DDP's mean of the ranks' mean losses the batch's mean
        return idx.tensor_split(self.world_size)[self.rank]

    def mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)  # NCCL reduces GPU tensors only
        self.dist.all_reduce(t)
        return float(t) / self.world_size

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_agree(self, metrics: dict[str, float]) -> None:
        """Fail loudly if the ranks' final metrics differ: their weights drifted apart."""
        scores = {k: v for k, v in metrics.items() if k.startswith(("val/", "test/", "best_epoch", "epochs"))}
        gathered: list[Any] = [None] * self.world_size
        self.dist.all_gather_object(gathered, scores)
        same = lambda a, b: a == b or a != a and b != b  # noqa: E731 - NaN agrees with NaN
        differ = sorted(k for k, v in scores.items() if not all(same(g[k], v) for g in gathered))
        if differ:
            raise RuntimeError(f"DDP ranks ended with different metrics {differ[:5]}: their weights diverged")
        log.info("DDP: %d ranks agree on every final metric", self.world_size)

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def make_strategy(name: str, device: torch.device) -> Single:
    """``trainer.strategy`` -> the strategy object the loop and ``train`` ask; its ``device`` is the one to use
    (under DDP on GPUs, the GPU torchrun's ``LOCAL_RANK`` names)."""
    if name == "single":
        return Single(device)
    if name == "ddp":
        return DDP(device)
    raise ValueError(f"trainer.strategy must be single or ddp, got {name!r}")
