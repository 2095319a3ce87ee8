"""``python -m vforge.train``: seed -> data -> model -> loss -> optimizer/scheduler -> logger -> fit -> metrics."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vforge.config import validate
from vforge.training.loop import fit, predict
from vforge.training.metrics import format_table, split_metrics

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train one model as ``cfg`` says; return its final val/test metrics in vol points."""
    validate(cfg)
    torch.manual_seed(cfg.seed)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    torch.use_deterministic_algorithms(cfg.trainer.deterministic, warn_only=True)

    data = instantiate(cfg.data, _convert_="all")
    log.info("data: %s", data.report)
    model = instantiate(cfg.model, n_num=data.n_num, cat_cardinalities=data.cat_cardinalities, d_out=1)
    loss_fn = instantiate(cfg.loss)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    steps = cfg.trainer.max_epochs * math.ceil(len(data.train) / cfg.trainer.batch_size)
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=steps) if cfg.scheduler else None
    logger = instantiate(cfg.logger) if cfg.logger else None

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if logger:
        logger.start(cfg, run_name=cfg.run_name, tags={"model": cfg.run_name})
        logger.log_dict(data.report, "data_report.json")
    status = "FAILED"
    try:
        result = fit(
            model, data, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
            max_epochs=cfg.trainer.max_epochs, batch_size=cfg.trainer.batch_size,
            eval_batch_size=cfg.trainer.eval_batch_size, patience=cfg.trainer.patience,
            grad_clip=cfg.trainer.grad_clip, progress=cfg.trainer.progress,
            on_epoch_end=(lambda epoch, m: logger.log_metrics(m, step=epoch)) if logger else None,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        metrics: dict[str, float] = {}
        for name in ("val", "test"):
            split = getattr(data, name)
            level = data.to_level(predict(model, split, cfg.trainer.eval_batch_size), split)
            metrics |= split_metrics(name, level, split.iv, split.persistence)
        metrics |= {"best_epoch": result.best_epoch, "epochs": result.epochs, "train_seconds": result.seconds,
                    "n_params": sum(p.numel() for p in model.parameters())}
        log.info("results\n%s", format_table(metrics, {"val": len(data.val), "test": len(data.test)}))
        checkpoint = out_dir / "model.pt"
        torch.save({"state_dict": model.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True),
                    "feature_names": data.feature_names, "x_mean": data.x_mean, "x_std": data.x_std,
                    "y_center": data.y_center, "y_scale": data.y_scale, "target": data.target}, checkpoint)
        if logger:
            logger.log_metrics(metrics)
            logger.log_artifact(checkpoint, "model")
        status = "FINISHED"
        return metrics
    finally:
        if logger:
            logger.end(status)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    metrics = train(cfg)
    return metrics[cfg.optimized_metric]


if __name__ == "__main__":
    main()
