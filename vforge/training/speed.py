"""Speed options that need a word of code: device choice and gradient checkpointing."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vforge.training.callbacks import Callback

if TYPE_CHECKING:
    from vforge.training.state import FitState


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU fails with the fix."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={device!r} but no CUDA device is available; use trainer.device=cpu")
    return torch.device(device)


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def enable_grad_checkpointing(model: nn.Module) -> int:
    """Recompute each block of ``model.blocks`` (or the shallowest ``*.blocks``, e.g. ``model.backbone.blocks``) in
    backward instead of storing its activations.

    A model that knows better defines ``set_grad_checkpointing(enabled)``; it is called instead. Returns the
    number of blocks wrapped. Call it after any ``deepcopy`` of the model (weight averaging makes one): the
    wrapper is an instance attribute bound to this model's blocks. Dropout masks are replayed exactly in
    the recomputation (``checkpoint`` restores the RNG state).
    """
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)  # type: ignore[operator]  # the model's own method, per hasattr
        return -1
    # the shallowest module list named `blocks`: model.blocks (MLP, ResNet) or model.backbone.blocks (transformers)
    found = [m for name, m in model.named_modules() if name.split(".")[-1] == "blocks"
             and isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m)]
    blocks = found[0] if found else None  # named_modules is pre-order: the first is the shallowest
    if blocks is None:
        raise ValueError(f"trainer.grad_checkpointing=true needs a model with a `blocks` Sequential/ModuleList or a "
                         f"set_grad_checkpointing method; {type(model).__name__} has neither. Set "
                         "trainer.grad_checkpointing=false")
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward)
    return len(blocks)


class GradCheckpointing(Callback):
    """Enable gradient checkpointing at fit start: list it after the averaging callback (which copies the model)."""

    def on_fit_start(self, state: FitState) -> None:
        enable_grad_checkpointing(state.model)
