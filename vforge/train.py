"""``python -m vforge.train``: seed -> data -> loss -> model -> optimizer/scheduler -> averaging -> logger -> fit
-> metrics."""

from __future__ import annotations

import atexit
import gc
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vforge import CONF_DIR
from vforge.config import validate
from vforge.data.dataset import Dataset, format_report
from vforge.evaluation.report import evaluate_run
from vforge.models.base import Model, enable_grad_checkpointing
from vforge.serving import ModelBundle
from vforge.sweeps.console import ONCE_PER_SWEEP
from vforge.tracking.mlflow import run_tags
from vforge.training.boosting import blend_lightgbm
from vforge.training.callbacks import Callback, fit_callbacks, run_status
from vforge.training.checkpoint import Checkpoint, Resume
from vforge.training.device import set_up_torch
from vforge.training.distributed import Single, make_strategy
from vforge.training.gating import do_no_harm
from vforge.training.loop import evaluate, fit, solve
from vforge.training.losses import Loss, as_loss
from vforge.training.optim import param_groups
from vforge.training.state import FitResult

log = logging.getLogger(__name__)
# At exit, skip the interpreter's last garbage collection over every object torch, pandas and mlflow made (2-3 s
# of a run's end on 2 cores): the process is ending and the OS takes the memory back. Registered at import, before
# the handlers of what the run starts (MLflow's), so it runs after them.
atexit.register(gc.freeze)


def train(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> dict[str, float]:
    """Train one model as ``cfg`` says; return its final val/test metrics in vol points.

    ``callbacks`` run after the built-in ones (early stopping, logging, checkpoints); one that raises from
    ``on_epoch_end`` stops the fit, ends the MLflow run (KILLED for ``TrainingInterrupted``, else FAILED) and
    the exception propagates.
    """
    validate(cfg)
    if cfg.evaluation.name == "walk_forward":  # one run per fold (each through this function), scored together
        return train_walk_forward(cfg, callbacks)
    tr = cfg.trainer
    device = set_up_torch(cfg.seed, device=tr.device, num_threads=tr.num_threads, deterministic=tr.deterministic)
    strategy = make_strategy(tr.strategy, device)  # DDP: rank 0 alone logs, saves, prints
    data = instantiate(cfg.data, _convert_="all")
    log.info("%s", format_report(data.report), extra={ONCE_PER_SWEEP: True})
    loss_fn = as_loss(instantiate(cfg.loss, _convert_="all")).to(strategy.device)
    model = new_model(cfg, data, loss_fn.d_out, strategy.device)
    optimizer, scheduler, averaging = training_parts(cfg, model, len(data.train))
    extra = [instantiate(c) for c in (tr.callbacks or {}).values()]
    config = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    out_dir = Path(strategy.broadcast(cfg.output_dir))  # each torchrun process resolved its own ${now:}
    resume = Resume.find(tr.resume, out_dir, run_name=cfg.run_name, siblings=cfg.get("trial") is None, config=config,
                         device=strategy.device, broadcast=strategy.broadcast, is_main=strategy.is_main)
    logger = instantiate(cfg.logger) if cfg.logger and strategy.is_main else None
    if logger:
        logger.start(cfg, run_name=cfg.run_name, tags=run_tags(cfg), run_id=resume.mlflow_run_id(logger),
                     run_dir=resume.run_dir)
        if not resume.ckpt:
            logger.log_dict(data.report, "data_report.json")
    status = "FAILED"
    try:
        checkpoint = Checkpoint(resume.ckpt_dir, extra={"run_name": cfg.run_name, "config": config, "mlflow_run_id":
                                logger.run_id if logger else None}) if tr.checkpoint and strategy.is_main else None
        cbs = fit_callbacks(averaging=averaging, patience=tr.patience, logger=logger, checkpoint=checkpoint,
                            progress=tr.progress if strategy.is_main else False, extra=extra, user=callbacks)
        if isinstance(model, Model) and model.closed_form:
            result = solve(model, data, tr.eval_batch_size)
        else:
            result = fit(model, data, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler, callbacks=cbs,
                         generator=torch.Generator().manual_seed(cfg.seed), resume=resume.ckpt, strategy=strategy,
                         **fit_options(tr))
            if tr.get("n_seeds", 1) > 1:
                result, config = seed_average(cfg, result, data, loss_fn, strategy, config)
        metrics = finish(cfg, result, model, data, loss_fn, config, strategy, logger, out_dir)
        status = "FINISHED"
        return metrics
    except BaseException as e:
        status = run_status(e)
        raise
    finally:
        if logger:
            logger.end(status)
        strategy.close()


def new_model(cfg: DictConfig, data: Dataset, d_out: int, device: torch.device) -> nn.Module:
    """The configured model for ``data``'s inputs (with gradient checkpointing when the trainer asks)."""
    model = instantiate(cfg.model, n_num=data.n_num, cat_cardinalities=data.cat_cardinalities, d_out=d_out)
    if isinstance(model, Model) and (info := model.prepare(data)):
        log.info("%s prepared before training: %s", type(model).__name__, info.get("why", info))
    model = model.to(device)
    if cfg.trainer.grad_checkpointing:
        enable_grad_checkpointing(model)
    return model


def training_parts(cfg: DictConfig, model: nn.Module, n_train: int) -> tuple[Any, Any, list[Callback]]:
    """The optimizer, the scheduler (over the whole run's steps) and the weight averaging of one fit of ``model``."""
    tr = cfg.trainer
    optimizer = instantiate(cfg.optimizer)(param_groups(model))
    steps = tr.max_epochs * math.ceil(math.ceil(n_train / tr.batch_size) / tr.accumulate)
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=steps) if cfg.scheduler else None
    return optimizer, scheduler, [instantiate(cfg.averaging)] if cfg.averaging else []


def fit_options(tr: DictConfig) -> dict[str, Any]:
    """``fit``'s keyword arguments that ``cfg.trainer`` sets."""
    return dict(max_epochs=tr.max_epochs, batch_size=tr.batch_size, eval_batch_size=tr.eval_batch_size,
                grad_clip=tr.grad_clip, accumulate=tr.accumulate, precision=tr.precision, compile=tr.compile)


def seed_average(cfg: DictConfig, first: FitResult, data: Dataset, loss_fn: Loss, strategy: Single,
                 config: dict[str, Any]) -> tuple[FitResult, dict[str, Any]]:
    """``trainer.n_seeds=k``: ``k - 1`` more networks of the run's config, on seeds ``seed + 1 .. seed + k - 1``
    (their own initialisation and batch order, early stopping on their own validation RMSE; not checkpointed, not
    logged per epoch: the run's epoch curves are the first network's), and the result over their average
    (``vforge.models.average``), with the config that rebuilds it."""
    from vforge.models import average

    tr = cfg.trainer
    results = [first]
    for k in range(1, tr.n_seeds):
        torch.manual_seed(cfg.seed + k)
        model = new_model(cfg, data, loss_fn.d_out, strategy.device)
        optimizer, scheduler, averaging = training_parts(cfg, model, len(data.train))
        log.info("network %d of %d (seed %d)", k + 1, tr.n_seeds, cfg.seed + k)
        cbs = fit_callbacks(averaging=averaging, patience=tr.patience, logger=None, checkpoint=None,
                            progress=tr.progress if strategy.is_main else False, extra=[], user=[])
        results.append(fit(model, data, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler, callbacks=cbs,
                           generator=torch.Generator().manual_seed(cfg.seed + k), strategy=strategy,
                           **fit_options(tr)))
    model = average.SeedAverage.of([r.model for r in results])
    log.info("averaged %d networks (best val RMSE each: %s)", len(results),
             ", ".join(f"{r.best_val_rmse:.3f}" for r in results))
    result = FitResult(best_epoch=first.best_epoch, best_val_rmse=first.best_val_rmse, epochs=first.epochs,
                       seconds=sum(r.seconds for r in results), history=first.history, model=model)
    return result, {**config, "model": average.config(config["model"], tr.n_seeds)}


def train_walk_forward(cfg: DictConfig, callbacks: Sequence[Callback]) -> dict[str, float]:
    """``evaluation=walk_forward``: one :func:`train` per fold, scored together; the pooled metrics."""
    from vforge.evaluation.walk_forward import walk_forward

    wf = walk_forward(cfg, train, callbacks)
    log.info("%s", wf.text)
    (Path(cfg.output_dir) / "metrics.json").write_text(json.dumps(wf.metrics, indent=1))
    return wf.metrics


def finish(cfg: DictConfig, result: FitResult, model: nn.Module, data: Dataset, loss_fn: Loss, config: dict[str, Any],
           strategy: Single, logger: Any, out_dir: Path) -> dict[str, float]:
    """After the fit: the do-no-harm gate, val/test metrics, and (rank 0) the run's evaluation, ``model.pt``,
    ``metrics.json`` and their logging."""
    tr = cfg.trainer
    kept = do_no_harm(cfg.get("do_no_harm"), result.model, data, config, d_out=loss_fn.d_out,
                      batch_size=tr.eval_batch_size)
    if not (isinstance(model, Model) and model.closed_form):  # model=linear stays the ridge
        kept = blend_lightgbm(cfg.get("do_no_harm"), kept, data, d_out=loss_fn.d_out, seed=cfg.seed,
                              n_threads=tr.num_threads or 2)
    final, config = kept.module, kept.config
    metrics, predictions = evaluate(final, model, data, loss_fn, tr.eval_batch_size)
    metrics |= kept.metrics
    metrics |= {"best_epoch": result.best_epoch, "epochs": result.epochs, "train_seconds": result.seconds,
                "n_params": sum(p.numel() for p in final.parameters())}  # the saved predictor
    strategy.check_agree(metrics)
    if not strategy.is_main:  # the other ranks hold the same model: rank 0 alone evaluates, saves and logs
        return metrics
    report = evaluate_run(data, predictions, out_dir, cfg.evaluation, logger=logger, history=result.history)
    metrics |= report.metrics
    log.info("%s%s\nevaluation took %.2f s", report.text, kept.note, report.seconds)
    checkpoint = out_dir / "model.pt"
    ModelBundle.of(final, data, loss_fn, config).save(checkpoint)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if logger:
        logger.log_metrics(metrics)
        logger.log_checkpoint(checkpoint)
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    # report to the Optuna trial when a sweep runs this job; a trial its time budget cut short ends pruned
    from vforge.sweeps.pruning import raise_if_budget_spent, sweep_callbacks

    callbacks = sweep_callbacks(cfg)
    metrics = train(cfg, callbacks=callbacks)
    raise_if_budget_spent(callbacks)
    return metrics[cfg.optimized_metric]


if __name__ == "__main__":
    main()
