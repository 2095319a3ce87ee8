"""The device a run trains on (``trainer.device``) and torch's process-wide settings for it."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU fails with the fix."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={device!r} but no CUDA device is available; use trainer.device=cpu")
    return torch.device(device)


def set_up_torch(seed: int, *, device: str, num_threads: int | None, deterministic: bool) -> torch.device:
    """Seed torch, set its threads and determinism (``trainer.num_threads``, ``trainer.deterministic``); the device."""
    torch.manual_seed(seed)
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    return resolve_device(device)
