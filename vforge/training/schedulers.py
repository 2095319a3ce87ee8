"""Learning-rate schedules that torch does not ship as one object."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_fraction: float = 0.05
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to zero; step every batch."""
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction=}")
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def one_cycle(optimizer: torch.optim.Optimizer, *, total_steps: int, max_lr_factor: float = 10.0,
              pct_start: float = 0.3) -> torch.optim.lr_scheduler.OneCycleLR:
    """Smith's one-cycle policy (``torch.optim.lr_scheduler.OneCycleLR``), stepped every batch. The peak is
    ``max_lr_factor`` times each group's configured lr, so ``optimizer.lr`` keeps its meaning of a base rate."""
    if max_lr_factor < 1 or not 0 < pct_start < 1:
        raise ValueError(f"need max_lr_factor >= 1 and 0 < pct_start < 1, got {max_lr_factor=}, {pct_start=}")
    max_lr = [g["lr"] * max_lr_factor for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(1, total_steps),
                                               pct_start=pct_start, div_factor=max_lr_factor)


def plateau(optimizer: torch.optim.Optimizer, *, total_steps: int, factor: float = 0.5, patience: int = 2,
            min_lr: float = 1e-6) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """Multiply the lr by ``factor`` after ``patience`` epochs without val RMSE improvement; the loop steps it
    once an epoch with the val RMSE (``total_steps`` is accepted for a uniform signature and unused)."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=factor, patience=patience,
                                                      min_lr=min_lr)
