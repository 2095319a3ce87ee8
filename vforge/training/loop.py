"""The training loop: in-memory tensors, random permutation + slicing, early stopping on val RMSE."""

from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from vforge.data.dataset import Dataset, Split
from vforge.training.metrics import VOL_POINTS

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    best_epoch: int
    best_val_rmse: float
    epochs: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


@torch.inference_mode()
def predict(model: nn.Module, split: Split, batch_size: int = 8192) -> np.ndarray:
    """Model outputs (n,) in target units, in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    out = []
    for lo in range(0, len(split), batch_size):
        x_cat = None if split.x_cat is None else split.x_cat[lo : lo + batch_size]
        out.append(model(split.x_num[lo : lo + batch_size], x_cat)[:, 0])
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.empty(0)


def val_rmse(model: nn.Module, data: Dataset, batch_size: int) -> float:
    """Validation RMSE of IV levels in vol points."""
    level = data.to_level(predict(model, data.val, batch_size), data.val)
    return float(np.sqrt(np.mean((level - data.val.iv) ** 2)) * VOL_POINTS)


def _progress(enabled: str | bool, total: int, desc: str):
    show = sys.stderr.isatty() if enabled == "auto" else bool(enabled)
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="batch")


def fit(model: nn.Module, data: Dataset, *, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None, max_epochs: int, batch_size: int,
        eval_batch_size: int, patience: int, grad_clip: float | None, progress: str | bool = "auto",
        on_epoch_end=None, generator: torch.Generator | None = None) -> FitResult:
    """Train ``model`` in place and leave it holding the weights of its best validation epoch.

    ``on_epoch_end(epoch, metrics)`` is called after each epoch (logging, pruning).
    """
    train = data.train
    n = len(train)
    best_rmse, best_epoch, best_state, bad_epochs = float("inf"), -1, None, 0
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    epoch = 0
    for epoch in range(max_epochs):
        model.train()
        perm = torch.randperm(n, generator=generator)
        total, count = torch.zeros(()), 0
        bar = _progress(progress, (n + batch_size - 1) // batch_size, f"epoch {epoch}")
        for lo in range(0, n, batch_size):
            idx = perm[lo : lo + batch_size]
            if len(idx) < 2 and n > 1:  # a batch of one breaks BatchNorm; drop the straggler
                continue
            x_cat = None if train.x_cat is None else train.x_cat[idx]
            pred = model(train.x_num[idx], x_cat)[:, 0]
            loss = loss_fn(pred, train.y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += loss.detach() * len(idx)  # no .item() per batch: it would sync every step
            count += len(idx)
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        rmse = val_rmse(model, data, eval_batch_size)
        metrics = {"train/loss": float(total) / max(count, 1), "val/rmse_epoch": rmse,
                   "lr": optimizer.param_groups[0]["lr"]}
        history.append(metrics)
        improved = rmse < best_rmse
        if improved:
            best_rmse, best_epoch, bad_epochs = rmse, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
        log.info("epoch %3d  train loss %.4f  val RMSE %.3f vol pts%s", epoch, metrics["train/loss"], rmse,
                 "  *" if improved else "")
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
        if bad_epochs >= patience:
            log.info("early stop: no val improvement for %d epochs", patience)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(best_epoch, best_rmse, epoch + 1, time.perf_counter() - start, history)
