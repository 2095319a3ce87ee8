"""The training loop: in-memory tensors, random permutation + slicing, callbacks for everything else.

Early stopping, checkpoints, averaging, logging, progress and pruning are callbacks
(``vforge.training.callbacks``); the loop only trains, validates and calls them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vforge.data.dataset import Dataset, Split
from vforge.data.target import VOL_POINTS
from vforge.evaluation.metrics import conformal_metrics, interval_metrics, split_metrics
from vforge.models.base import Model
from vforge.training.callbacks import Callback
from vforge.training.checkpoint import restore
from vforge.training.distributed import Single
from vforge.training.losses import Loss, RowContext
from vforge.training.state import FitResult, FitState

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message names the epoch, the step and the likely cause."""


class TrainingForward(nn.Module):
    """The training forward of ``model`` as a module's ``forward`` (what DDP hooks): ``Model.forward_train``, the
    output and the model's auxiliary loss (None for a plain ``nn.Module``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x_num: Tensor, x_cat: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if isinstance(self.model, Model):
            return self.model.forward_train(x_num, x_cat)
        return self.model(x_num, x_cat), None


def split_aux(data: Dataset, split: Split) -> dict[str, Tensor]:
    """The split's unscaled per-row context as float tensors (``Split.aux`` plus ``base``)."""
    aux = {k: torch.as_tensor(v) for k, v in (getattr(split, "aux", None) or {}).items()}
    aux.setdefault("base", torch.as_tensor(np.asarray(split.base, dtype=np.float32)))
    return {k: v.float() if v.is_floating_point() else v for k, v in aux.items()}


@torch.inference_mode()
def predict_outputs(model: nn.Module, split: Split, batch_size: int = 8192) -> np.ndarray:
    """Model outputs (n, d_out) in target units, in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for lo in range(0, len(split), batch_size):
        x_cat = None if split.x_cat is None else split.x_cat[lo : lo + batch_size].to(device)
        out.append(model(split.x_num[lo : lo + batch_size].to(device), x_cat).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.empty((0, 1), dtype=np.float32)


def predict(model: nn.Module, split: Split, batch_size: int = 8192, output: int = 0) -> np.ndarray:
    """Point predictions (n,) in target units: output column ``output`` (the median's for a quantile loss)."""
    return predict_outputs(model, split, batch_size)[:, output]


def val_rmse(model: nn.Module, data: Dataset, batch_size: int, output: int = 0) -> float:
    """Validation RMSE of IV levels in vol points."""
    level = data.to_level(predict(model, data.val, batch_size, output), data.val)
    return float(np.sqrt(np.mean((level - data.val.iv) ** 2)) * VOL_POINTS)


def diagnose(loss_log: Tensor, step: int, x: Tensor, y: Tensor, loss_fn: Loss, lr: float, epoch: int) -> str:
    """The message for a non-finite loss: where it happened and the likely cause."""
    head = f"loss became {float(loss_log[step])} at epoch {epoch} step {step}"
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return f"{head}: the batch holds NaN/inf features or targets; check the data (its report and data.features)"
    finite = loss_log[:step][torch.isfinite(loss_log[:step])]
    if len(finite) >= 2 and float(finite[-1]) > 10 * float(finite.min()):
        return (f"{head} after growing from {float(finite.min()):.4g} to {float(finite[-1]):.4g}: the learning rate "
                f"(lr={lr:.3g}) is likely too high; lower optimizer.lr, or set trainer.grad_clip=1.0")
    return (f"{head} with finite inputs and no growth before: likely the loss ({type(loss_fn).__name__}) "
            f"on an extreme prediction (log or division of a non-positive IV), else the learning rate (lr={lr:.3g})")


def fit(model: nn.Module, data: Dataset, *, loss_fn: Loss, optimizer: torch.optim.Optimizer, scheduler: Any = None,
        max_epochs: int, batch_size: int, eval_batch_size: int = 8192, grad_clip: float | None = None,
        accumulate: int = 1, precision: str = "fp32", compile: bool = False, callbacks: Sequence[Callback] = (),
        generator: torch.Generator | None = None, resume: dict[str, Any] | None = None,
        strategy: Single | None = None) -> FitResult:
    """Train ``model`` in place; return the evaluated model (averaged when averaging is on) in the result.

    ``scheduler`` is stepped every optimizer step, except ``ReduceLROnPlateau``: every epoch on val RMSE.
    ``resume`` is a ``last.pt`` dict: the fit continues after its epoch, bit for bit. ``strategy``
    (vforge/training/distributed.py) gives each DDP rank its share of every batch of ``batch_size`` rows.
    """
    device = next(model.parameters()).device
    strategy = strategy or Single(device)
    train, n = data.train, len(data.train)
    x_num, y = train.x_num.to(device), train.y.to(device)
    x_cat = None if train.x_cat is None else train.x_cat.to(device)
    # per-row context only for losses that use it: slicing it every step is not free
    aux = {k: v.to(device) for k, v in split_aux(data, train).items()} if loss_fn.needs_levels else {}
    # drop a straggler batch too small to give every rank two rows (one row breaks BatchNorm)
    batches_per_epoch = math.ceil(n / batch_size) - (1 if 0 < n % batch_size < 2 * strategy.world_size
                                                     and n > batch_size else 0)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" and device.type == "cuda" else None
    state = FitState(model, data, optimizer, scheduler, max_epochs, batch_size,
                     steps_per_epoch=math.ceil(batches_per_epoch / accumulate), generator=generator,
                     grad_scaler=scaler)
    callbacks = list(callbacks)
    state.callbacks = list(callbacks)  # the checkpoint saves every one's state
    for cb in callbacks:
        cb.on_fit_start(state)
    if resume is not None:
        restore(state, callbacks, resume)
    forward: Callable[..., tuple[Tensor, Tensor | None]] = strategy.wrap(TrainingForward(model))  # DDP all-reduces
    forward = torch.compile(forward) if compile else forward  # the gradients in backward
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    output = loss_fn.point_index
    change, plain = data.target == "change", RowContext()
    loss_fn.bind(model, data)  # e.g. the surface loss's probe inputs
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    start = time.perf_counter()
    for epoch in range(state.epoch, max_epochs if not state.stop else state.epoch):
        state.epoch = epoch
        model.train()
        perm = torch.randperm(n, generator=generator).to(device)
        batches = [strategy.shard(b) for b in perm.split(batch_size)[:batches_per_epoch]]  # this rank's rows
        losses = []  # per-step losses, checked once an epoch: no per-step sync
        for i, idx in enumerate(batches):
            context = RowContext({k: v[idx] for k, v in aux.items()}, data.y_center, data.y_scale, change,
                                 rows=idx) if aux else plain
            with autocast():
                pred, model_loss = forward(x_num[idx], None if x_cat is None else x_cat[idx])
            loss = loss_fn(pred.float(), y[idx], context)
            if model_loss is not None:  # e.g. TabNet's sparsity term
                loss = loss + model_loss
            losses.append(loss.detach())
            if accumulate > 1:
                loss = loss / accumulate
            (scaler.scale(loss) if scaler else loss).backward()
            if (i + 1) % accumulate and i + 1 < len(batches):
                continue  # accumulate gradients over `accumulate` batches
            if scaler:
                scaler.unscale_(optimizer)
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer) if scaler else optimizer.step()
            if scaler:
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if state.scheduler is not None and not plateau:
                state.scheduler.step()
            state.step += 1
            for cb in callbacks:
                cb.on_step_end(state)
        loss_log = torch.stack(losses)
        bad = (~torch.isfinite(loss_log)).nonzero()
        if strategy.mean(float(len(bad) > 0)):  # stop (every rank) before any callback can checkpoint broken weights
            if not len(bad):
                raise NonFiniteLossError(f"the loss became non-finite on another DDP rank in epoch {state.epoch}")
            step = int(bad[0])
            raise NonFiniteLossError(diagnose(loss_log.cpu(), step, x_num[batches[step]], y[batches[step]], loss_fn,
                                              optimizer.param_groups[0]["lr"], state.epoch))
        for cb in callbacks:
            cb.on_train_epoch_end(state)
        sizes = torch.tensor([len(b) for b in batches], dtype=loss_log.dtype, device=device)
        state.metrics = {"train/loss": strategy.mean(float((loss_log * sizes).sum() / sizes.sum())),
                         "val/rmse_epoch": val_rmse(state.eval_model, data, eval_batch_size, output),
                         "lr": optimizer.param_groups[0]["lr"]}
        state.metrics |= {f"train/{k}_penalty": v for k, v in loss_fn.metrics().items()}
        if state.eval_model is not model:  # averaging: the raw weights' score beside the averaged ones
            state.metrics["val/raw_rmse_epoch"] = val_rmse(model, data, eval_batch_size, output)
        if plateau and state.scheduler is not None:
            state.scheduler.step(state.metrics["val/rmse_epoch"])
        state.history.append(state.metrics)
        for cb in callbacks:
            cb.on_epoch_end(state)
        if state.stop:
            break
    for cb in callbacks:
        cb.on_fit_end(state)
    return FitResult(state.best_epoch, state.best_value, len(state.history), time.perf_counter() - start, state.history,
                     state.eval_model)


def solve(model: Model, data: Dataset, eval_batch_size: int = 8192) -> FitResult:
    """A ``closed_form`` model (``model=linear``) solved on the training split instead of trained."""
    start = time.perf_counter()
    train = data.train
    info = model.fit_closed_form(train.x_num, train.x_cat, train.y, train.aux["quote_date_idx"].numpy())
    log.info("linear: penalty %s chosen on %d walk-forward fold dates inside train (%s); robust scores %s",
             info["alpha"], info["fold_dates"], info["why"], info["scores"])
    return FitResult(0, val_rmse(model, data, eval_batch_size), 0, time.perf_counter() - start, [], model)


def evaluate(final: nn.Module, raw: nn.Module, data: Dataset, loss_fn: Loss,
             batch_size: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Val/test metrics of the final (averaged, best-epoch) model; interval coverage for quantile losses; the raw
    weights' val RMSE when averaging is on. Also returns the point predictions, IV levels (n,) per split."""
    out_idx = loss_fn.point_index
    metrics: dict[str, float] = {}
    levels: dict[str, np.ndarray] = {}
    points: dict[str, np.ndarray] = {}
    for name in ("val", "test"):
        split = getattr(data, name)
        outputs = predict_outputs(final, split, batch_size)
        points[name] = data.to_level(outputs[:, out_idx], split)
        metrics |= split_metrics(name, points[name], split.iv, split.persistence, split.base)
        if loss_fn.intervals():
            levels[name] = np.stack([data.to_level(outputs[:, j], split) for j in range(outputs.shape[1])], axis=1)
            metrics |= interval_metrics(name, levels[name], split.iv, loss_fn.intervals())
    if levels:
        metrics |= conformal_metrics(levels["val"], data.val.iv, levels["test"], data.test.iv, loss_fn.intervals())
    if final is not raw:
        metrics["val/raw_rmse"] = val_rmse(raw, data, batch_size, out_idx)
    return metrics, points

