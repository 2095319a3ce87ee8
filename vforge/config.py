"""Checks that span config groups; run first in ``train()``, before any work."""

from __future__ import annotations

from omegaconf import DictConfig

from vforge.evaluation.metrics import logged_metric_names
from vforge.training.checks import coverages, validate_training


def validate(cfg: DictConfig) -> None:
    walk_forward = cfg.evaluation.name == "walk_forward"
    names = logged_metric_names(averaging=cfg.get("averaging") is not None, coverages=coverages(cfg),
                                walk_forward=walk_forward)
    if cfg.optimized_metric not in names:
        hint = "; with evaluation=walk_forward a run logs the wf/* metrics and val/rmse (mean over folds)" \
            if walk_forward else ""
        raise ValueError(
            f"optimized_metric={cfg.optimized_metric!r} is not logged; logged metrics: {', '.join(names)}{hint}. "
            "Set it on the command line (optimized_metric=val/rmse) or in conf/hparams_search/<model>.yaml"
        )
    if cfg.data.target not in ("level", "change"):
        raise ValueError(f"data.target={cfg.data.target!r} must be 'level' or 'change' (e.g. data.target=change)")
    if cfg.trainer.max_epochs < 1 or cfg.trainer.batch_size < 1:
        raise ValueError(
            f"trainer.max_epochs and trainer.batch_size must be >= 1, got "
            f"{cfg.trainer.max_epochs=}, {cfg.trainer.batch_size=}"
        )
    if cfg.trainer.get("n_seeds", 1) < 1:
        raise ValueError(f"trainer.n_seeds must be >= 1 (the networks trained and averaged), got {cfg.trainer.n_seeds}")
    validate_training(cfg)
