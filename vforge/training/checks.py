"""Checks on the training groups (loss, trainer, averaging) that need more than one group; called from
``vforge.config.validate`` so a config that cannot work fails before any data is built."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig

from vforge.training.losses import Loss, as_loss

PRECISIONS = ("fp32", "bf16", "fp16")


def training_loss(cfg: DictConfig) -> Loss:
    return as_loss(instantiate(cfg.loss, _convert_="all"))


def coverages(cfg: DictConfig) -> tuple[float, ...]:
    """Nominal coverages of the intervals the configured loss predicts (quantile loss), else ()."""
    return tuple(nominal for _, _, nominal in training_loss(cfg).intervals())


def validate_training(cfg: DictConfig) -> None:
    tr = cfg.trainer
    if tr.precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={tr.precision!r} must be one of {', '.join(PRECISIONS)}")
    if tr.precision == "fp16" and not str(tr.device).startswith("cuda"):
        import torch

        if not (tr.device == "auto" and torch.cuda.is_available()):
            raise ValueError("trainer.precision=fp16 needs a CUDA device (CPU autocast is bf16); "
                             "use trainer.precision=bf16 or trainer.device=cuda")
    if tr.accumulate < 1:
        raise ValueError(f"trainer.accumulate must be >= 1, got {tr.accumulate}")
    if tr.patience < 1:
        raise ValueError(f"trainer.patience must be >= 1, got {tr.patience}")
    loss = training_loss(cfg)
    d_model = cfg.model.get("d_out") if cfg.get("model") is not None else None
    if d_model is not None and d_model != loss.d_out:
        raise ValueError(
            f"model.d_out={d_model} does not match the loss: {type(loss).__name__} needs d_out={loss.d_out} "
            f"(one output per quantile for loss=quantile). Remove model.d_out; train() sets it from the loss")
    loss.check_features(list(cfg.data.get("features") or []))
    if tr.callbacks and not hasattr(tr.callbacks, "items"):
        raise ValueError("trainer.callbacks must map names to {_target_: ...} nodes, e.g. "
                         "+trainer.callbacks.mine._target_=my.module.MyCallback")
