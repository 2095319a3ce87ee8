"""The contract every vforge model keeps, and the hooks the training loop and ``train()`` call on a model.

``forward(x_num, x_cat) -> (batch, d_out)`` is the contract (STYLE.md). :class:`Model` declares the rest, each
with its default, so a reader sees the whole protocol here: the training forward with an auxiliary loss,
gradient checkpointing (timm's ``set_grad_checkpointing``: the model owns it, nothing patches its blocks), and a
closed-form solution for the models that are solved rather than trained.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class Model(nn.Module):
    """Base class of vforge's models."""

    closed_form: ClassVar[bool] = False  # True: train() calls fit_closed_form instead of the training loop
    grad_checkpointing: bool = False  # set by set_grad_checkpointing; forward recomputes checkpoint_blocks()

    def forward_train(self, x_num: Tensor, x_cat: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """What the loop calls in training: the output (batch, d_out) and an auxiliary loss to add to the training
        loss (TabNet's sparsity term), or None."""
        return self(x_num, x_cat), None

    def checkpoint_blocks(self) -> nn.Sequential | nn.ModuleList:
        """The blocks that gradient checkpointing recomputes in backward; none by default."""
        return nn.ModuleList()

    def set_grad_checkpointing(self, enable: bool = True) -> int:
        """Recompute each of ``checkpoint_blocks()`` in backward instead of storing its activations: less memory for
        about one more forward of compute. Returns the number of blocks. Dropout masks are replayed exactly in the
        recomputation (``checkpoint`` restores the RNG state); a copy of the model (weight averaging) keeps the
        setting, and it only acts where gradients are taken."""
        blocks = self.checkpoint_blocks()
        if enable and not blocks:
            raise ValueError(f"trainer.grad_checkpointing=true needs a model with blocks to recompute; "
                             f"{type(self).__name__} has none. Set trainer.grad_checkpointing=false")
        self.grad_checkpointing = enable
        return len(blocks)

    def run_block(self, block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """``block(*args, **kwargs)``, recomputed in backward when gradient checkpointing is on and gradients are
        being taken."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    def run_blocks(self, blocks: nn.Sequential | nn.ModuleList, x: Tensor) -> Tensor:
        """``blocks`` one after the other, each through ``run_block``."""
        for block in blocks:
            x = self.run_block(block, x)
        return x

    def prepare(self, data: Any) -> dict[str, Any] | None:
        """Called by ``train()`` once the model is built, before the loop, with the run's ``Dataset``: what a model
        solves from the data before it is trained (``OnRidge``'s ridge); returns what to log, or None (the default:
        nothing)."""
        return None

    def fit_closed_form(self, x_num: Tensor, x_cat: Tensor | None, y: Tensor, dates: np.ndarray) -> dict[str, Any]:
        """Solve the model on the training split (``closed_form`` models); returns what to log about the solution."""
        raise NotImplementedError(f"{type(self).__name__} is trained by the loop, not solved (closed_form=False)")


def enable_grad_checkpointing(model: nn.Module) -> int:
    """``trainer.grad_checkpointing=true``: the model's ``set_grad_checkpointing``; the number of blocks it recomputes."""
    if not isinstance(model, Model):
        raise ValueError(f"trainer.grad_checkpointing=true needs a vforge model (vforge.models.base.Model) with "
                         f"blocks to recompute; {type(model).__name__} is not one. Set trainer.grad_checkpointing=false")
    return model.set_grad_checkpointing(True)
