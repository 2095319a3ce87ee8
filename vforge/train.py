"""``python -m vforge.train``: seed -> data -> loss -> model -> optimizer/scheduler -> averaging -> logger -> fit
-> metrics."""

from __future__ import annotations

import atexit
import gc
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vforge import CONF_DIR
from vforge.config import validate
from vforge.data.dataset import format_report
from vforge.evaluation.report import evaluate_run
from vforge.serving import ModelBundle
from vforge.sweeps.console import ONCE_PER_SWEEP
from vforge.tracking.mlflow import run_tags
from vforge.training.callbacks import Callback, EarlyStopping, EpochLog, Progress
from vforge.training.checkpoint import Checkpoint, check_compatible, find_resume, remove_stale_temp
from vforge.training.distributed import make_strategy
from vforge.training.gating import do_no_harm
from vforge.training.loop import FitResult, evaluate, fit, val_rmse
from vforge.training.losses import as_loss
from vforge.training.optim import param_groups
from vforge.training.speed import GradCheckpointing, resolve_device

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
        from vforge.evaluation.walk_forward import walk_forward

        wf = walk_forward(cfg, train, callbacks)
        log.info("%s", wf.text)
        (Path(cfg.output_dir) / "metrics.json").write_text(json.dumps(wf.metrics, indent=1))
        return wf.metrics
    tr = cfg.trainer
    torch.manual_seed(cfg.seed)
    if tr.num_threads:
        torch.set_num_threads(tr.num_threads)
    torch.use_deterministic_algorithms(tr.deterministic, warn_only=True)
    strategy = make_strategy(tr.strategy, resolve_device(tr.device))  # DDP: rank 0 alone logs, saves, prints
    device = strategy.device

    data = instantiate(cfg.data, _convert_="all")
    log.info("%s", format_report(data.report), extra={ONCE_PER_SWEEP: True})
    loss_fn = as_loss(instantiate(cfg.loss, _convert_="all")).to(device)
    model = instantiate(cfg.model, n_num=data.n_num, cat_cardinalities=data.cat_cardinalities,
                        d_out=loss_fn.d_out).to(device)
    optimizer = instantiate(cfg.optimizer)(param_groups(model))
    steps = tr.max_epochs * math.ceil(math.ceil(len(data.train) / tr.batch_size) / tr.accumulate)
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=steps) if cfg.scheduler else None
    averaging = [instantiate(cfg.averaging)] if cfg.averaging else []
    extra = [instantiate(c) for c in (tr.callbacks or {}).values()]
    out_dir = Path(strategy.broadcast(cfg.output_dir))  # each torchrun process resolved its own ${now:}
    resume_path = strategy.broadcast(find_resume(tr.resume, out_dir, cfg.run_name, siblings=cfg.get("trial") is None))
    resume = torch.load(resume_path, weights_only=False, map_location=device) if resume_path else None
    config = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    if resume:
        check_compatible(resume, config, resume_path)
    logger = instantiate(cfg.logger) if cfg.logger and strategy.is_main else None

    out_dir.mkdir(parents=True, exist_ok=True)
    if strategy.is_main:
        remove_stale_temp(out_dir)  # a model.pt write killed midway
    if logger:  # the run folder this training belongs to: the resumed checkpoint's, else this job's
        run_dir = resume_path.parent.parent if resume_path else out_dir
        run_id = resume.get("mlflow_run_id") if resume else logger.unfinished_folder_run(run_dir) if tr.resume else None
        logger.start(cfg, run_name=cfg.run_name, tags=run_tags(cfg), run_id=run_id, run_dir=run_dir)
        if not resume:
            logger.log_dict(data.report, "data_report.json")
    status = "FAILED"
    try:
        cbs: list[Callback] = [*averaging, EarlyStopping(patience=tr.patience), EpochLog(logger),
                               Progress(tr.progress if strategy.is_main else False)]
        if tr.checkpoint and strategy.is_main:  # last.pt / best.pt next to the checkpoint we resume from, else in this run's folder
            ckpt_dir = resume_path.parent if resume_path else out_dir / "checkpoints"
            cbs.append(Checkpoint(ckpt_dir, extra={"run_name": cfg.run_name, "config": config,  # saves every callback
                                                   "mlflow_run_id": logger.run_id if logger else None}))
        if resume:
            log.info("resuming from %s after epoch %d", resume_path, resume["epoch"])
        if tr.grad_checkpointing:  # after averaging's deepcopy of the model (see enable_grad_checkpointing)
            cbs.insert(len(averaging), GradCheckpointing())
        closed_form = getattr(model, "fit_closed_form", None)  # model=linear: solved, not trained
        if closed_form is not None:
            start = time.perf_counter()
            info = closed_form(data.train.x_num, data.train.x_cat, data.train.y, data.train.aux["quote_date_idx"].numpy())
            log.info("linear: penalty %s chosen on %d walk-forward fold dates inside train (%s); robust scores %s",
                     info["alpha"], info["fold_dates"], info["why"], info["scores"])
            result = FitResult(0, val_rmse(model, data, tr.eval_batch_size), 0, time.perf_counter() - start, [], model)
        else:
            result = fit(
                model, data, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler, max_epochs=tr.max_epochs,
                batch_size=tr.batch_size, eval_batch_size=tr.eval_batch_size, grad_clip=tr.grad_clip,
                accumulate=tr.accumulate, precision=tr.precision, compile=tr.compile,
                callbacks=[*cbs, *extra, *callbacks], generator=torch.Generator().manual_seed(cfg.seed), resume=resume,
                strategy=strategy,
            )
        kept = do_no_harm(cfg.get("do_no_harm"), result.model, data, config, d_out=loss_fn.d_out,
                          batch_size=tr.eval_batch_size)
        final, config = kept.module, kept.config
        metrics, predictions = evaluate(final, model, data, loss_fn, tr.eval_batch_size)
        metrics |= kept.metrics
        metrics |= {"best_epoch": result.best_epoch, "epochs": result.epochs, "train_seconds": result.seconds,
                    "n_params": sum(p.numel() for p in final.parameters())}  # the saved predictor
        strategy.check_agree(metrics)
        if not strategy.is_main:  # the other ranks hold the same model: rank 0 alone evaluates, saves and logs
            status = "FINISHED"
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
        status = "FINISHED"
        return metrics
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) or getattr(e, "run_status", None) == "KILLED" or \
                type(e).__name__ == "TrialPruned":
            status = "KILLED"
        raise
    finally:
        if logger:
            logger.end(status)
        strategy.close()


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
