"""The loop and its options: callbacks, guards, gradient accumulation, schedulers, weight-decay groups, speed."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from tests.conftest import CONF_DIR
from vforge.config import validate
from vforge.data.dataset import Dataset, Split
from vforge.models.base import Model, enable_grad_checkpointing
from vforge.models.mlp import MLP
from vforge.train import train
from vforge.training.callbacks import Callback
from vforge.training.checkpoint import Checkpoint
from vforge.training.loop import NonFiniteLossError, fit
from vforge.training.losses import MSE
from vforge.training.optim import param_groups
from vforge.training.schedulers import one_cycle, plateau, warmup_cosine


def linear_data(n: int = 64, seed: int = 0) -> Dataset:
    """y = x @ [1, -2, 0.5] + noise, as a level target with identity scaling."""
    g = torch.Generator().manual_seed(seed)

    def split(m: int) -> Split:
        x = torch.randn(m, 3, generator=g)
        y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(m, generator=g)
        return Split(x, None, y, y.double().numpy(), np.zeros(m), np.full(m, np.nan), pd.DataFrame(index=range(m)))

    return Dataset(split(n), split(32), split(32), ["a", "b", "c"], [], "level", 0.0, 1.0, np.zeros(3), np.ones(3))


def mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return MLP(n_num=3, cat_cardinalities=[], d_out=1, n_blocks=2, d_block=16, dropout=dropout)


def run(model: nn.Module, data: Dataset, **kw):
    kw = {"loss_fn": MSE(), "optimizer": torch.optim.SGD(model.parameters(), lr=0.01), "max_epochs": 1,
          "batch_size": 16, "generator": torch.Generator().manual_seed(0)} | kw
    return fit(model, data, **kw)


class Recorder(Callback):
    def __init__(self, stop_after: int | None = None) -> None:
        self.events: list[str] = []
        self.stop_after = stop_after

    def on_fit_start(self, state):
        self.events.append("fit_start")

    def on_step_end(self, state):
        self.events.append(f"step{state.step}")

    def on_train_epoch_end(self, state):
        self.events.append(f"train_end{state.epoch}")

    def on_epoch_end(self, state):
        assert {"train/loss", "val/rmse_epoch", "lr"} <= set(state.metrics)
        self.metrics = state.metrics
        self.events.append(f"epoch_end{state.epoch}")
        if state.epoch == self.stop_after:
            state.stop = True

    def on_fit_end(self, state):
        self.events.append("fit_end")


def test_callbacks_are_called_in_order_and_can_stop_the_fit():
    rec = Recorder(stop_after=1)
    result = run(mlp(), linear_data(48), max_epochs=5, callbacks=[rec])
    assert rec.events == ["fit_start", "step1", "step2", "step3", "train_end0", "epoch_end0",
                          "step4", "step5", "step6", "train_end1", "epoch_end1", "fit_end"]
    assert result.epochs == 2


def test_gradient_accumulation_equals_one_big_batch():
    data = linear_data(32)
    a, b = mlp(), mlp()
    run(a, data, batch_size=32, optimizer=torch.optim.SGD(a.parameters(), lr=0.1))
    run(b, data, batch_size=16, accumulate=2, optimizer=torch.optim.SGD(b.parameters(), lr=0.1))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_nan_loss_names_epoch_step_and_cause_and_keeps_the_last_good_checkpoint(tmp_path):
    class Poison(Callback):  # a weight turns NaN after step 2 of epoch 1
        def on_step_end(self, state):
            if state.epoch == 1 and state.step == state.steps_per_epoch + 2:
                with torch.no_grad():
                    next(state.model.parameters()).view(-1)[0] = float("nan")

    model, cbs = mlp(), [Poison()]
    cbs.append(Checkpoint(tmp_path, cbs))
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 1 step 2 .*learning rate"):
        run(model, linear_data(64), max_epochs=3, callbacks=cbs)
    last = torch.load(tmp_path / "last.pt", weights_only=False)
    assert last["epoch"] == 0 and all(torch.isfinite(v).all() for v in last["model"].values())


def test_nan_in_the_data_is_blamed_on_the_data():
    data = linear_data(64)
    data.train.x_num[5, 1] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"epoch 0 step \d+: the batch holds NaN/inf features"):
        run(mlp(), data, batch_size=64)


def test_diverging_learning_rate_is_named():
    model = mlp()
    with pytest.raises(NonFiniteLossError, match=r"after growing from .* the learning rate \(lr=1e\+06\)"):
        run(model, linear_data(256), batch_size=8, max_epochs=2,
            optimizer=torch.optim.SGD(model.parameters(), lr=1e6))


def test_auxiliary_model_loss_is_added():
    class WithAux(Model):
        def __init__(self):
            super().__init__()
            self.inner = mlp()

        def forward(self, x_num, x_cat=None):
            return self.inner(x_num, x_cat)

        def forward_train(self, x_num, x_cat=None):
            return self(x_num, x_cat), torch.tensor(5.0)

    plain = run(mlp(), linear_data(), optimizer=None or torch.optim.SGD(mlp().parameters(), lr=0.0))
    aux = WithAux()
    with_aux = run(aux, linear_data(), optimizer=torch.optim.SGD(aux.parameters(), lr=0.0))
    assert with_aux.history[0]["train/loss"] == pytest.approx(plain.history[0]["train/loss"] + 5.0)


def test_param_groups_exempt_biases_norms_and_embeddings():
    model = nn.ModuleDict({"lin": nn.Linear(3, 4), "norm": nn.LayerNorm(4), "emb": nn.Embedding(5, 4)})
    model.scale = nn.Parameter(torch.ones(4))  # a LayerScale-like gain
    decay, no_decay = param_groups(model)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 5 and no_decay["weight_decay"] == 0.0
    opt = torch.optim.AdamW([decay, no_decay], lr=1e-3, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("option", sorted(p.stem for p in (Path(CONF_DIR) / "optimizer").glob("*.yaml")))
def test_every_optimizer_takes_param_groups_and_steps(make_cfg, option):
    model = mlp()
    opt = instantiate(make_cfg(f"optimizer={option}").optimizer)(param_groups(model))
    model(torch.randn(8, 3)).pow(2).mean().backward()
    before = copy.deepcopy(model.state_dict())
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("option", ["adam", "adamw"])
def test_the_fused_adam_steps_are_the_reference_steps(make_cfg, option):
    models = [mlp(), mlp()]
    models[1].load_state_dict(models[0].state_dict())
    cfg = make_cfg(f"optimizer={option}", "optimizer.weight_decay=0.01").optimizer
    opts = [instantiate(cfg)(param_groups(models[0])), instantiate(cfg, fused=False)(param_groups(models[1]))]
    assert [o.defaults["fused"] for o in opts] == [True, False]
    x = torch.randn(64, 3)
    for _ in range(20):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(models[0].state_dict()["head.weight"], mlp().state_dict()["head.weight"])


def lrs(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_warmup_cosine_and_one_cycle_shapes():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    got = lrs(warmup_cosine(opt, total_steps=10, warmup_fraction=0.2), 10)
    assert got[:2] == pytest.approx([0.5, 1.0])
    assert got[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    got = lrs(one_cycle(opt, total_steps=20, max_lr_factor=10, pct_start=0.25), 20)
    assert got[0] == pytest.approx(0.1) and max(got) == pytest.approx(1.0) and got[-1] < 0.1


def test_plateau_halves_the_lr_once_val_stalls():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)  # val RMSE moves by less than the 1e-4 threshold
    result = run(model, linear_data(), optimizer=opt, scheduler=plateau(opt, total_steps=0, patience=1, min_lr=0.0),
                 max_epochs=4, callbacks=[])
    # history holds the lr each epoch ran with: bad epochs 1, 2 (> patience) -> halved for epoch 3
    assert [round(h["lr"] / 1e-6, 6) for h in result.history] == [1.0, 1.0, 1.0, 0.5]


def test_grad_checkpointing_gives_the_same_gradients_with_dropout():
    a = mlp(dropout=0.3)
    b = copy.deepcopy(a)
    assert enable_grad_checkpointing(b) == len(b.blocks)
    x = torch.randn(8, 3)
    for m in (a, b):
        torch.manual_seed(1)
        m(x).pow(2).sum().backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad), name
    with pytest.raises(ValueError, match="trainer.grad_checkpointing=true needs"):
        enable_grad_checkpointing(nn.Linear(3, 1))


def test_bf16_autocast_trains(make_cfg):
    metrics = train(make_cfg("trainer.precision=bf16"))
    assert math.isfinite(metrics["val/rmse"])


def test_configs_that_cannot_work_fail_before_training(make_cfg):
    with pytest.raises(ValueError, match="trainer.precision=fp16 needs a CUDA device"):
        validate(make_cfg("trainer.precision=fp16", "trainer.device=cpu"))
    with pytest.raises(ValueError, match="trainer.precision='fp8' must be one of"):
        validate(make_cfg("trainer.precision=fp8"))
    with pytest.raises(ValueError, match="trainer.accumulate must be >= 1"):
        validate(make_cfg("trainer.accumulate=0"))
    with pytest.raises(ValueError, match=r"optimized_metric='val/coverage90' is not logged"):
        validate(make_cfg("optimized_metric=val/coverage90"))
    validate(make_cfg("loss=quantile", "optimized_metric=val/coverage90"))
    validate(make_cfg("averaging=ema", "optimized_metric=val/raw_rmse"))


def test_quantile_run_logs_coverage_and_saves_the_median_index(make_cfg):
    cfg = make_cfg("loss=quantile")
    metrics = train(cfg)
    for key in ("val/coverage90", "val/coverage50", "test/coverage90", "val/width90"):
        assert 0 <= metrics[key] <= (1 if "coverage" in key else 100), key
    assert metrics["val/width90"] > metrics["val/width50"]
    saved = torch.load(Path(cfg.output_dir) / "model.pt", weights_only=False)
    assert saved["d_out"] == 5 and saved["output_index"] == 2 and saved["quantiles"][2] == 0.5


@pytest.mark.parametrize("overrides", [["loss=surface", "loss.n_probe=32"], ["loss=vega_weighted"],
                                       ["scheduler=onecycle", "trainer.accumulate=2"], ["scheduler=plateau"]])
def test_level_losses_and_schedules_train_end_to_end(make_cfg, overrides):
    metrics = train(make_cfg(*overrides), callbacks=[history := Recorder()])
    assert math.isfinite(metrics["val/rmse"]) and math.isfinite(metrics["test/rmse"])
    if "loss=surface" in overrides:
        assert {"train/calendar_penalty", "train/butterfly_penalty"} <= set(history.metrics)


@pytest.mark.slow
def test_torch_compile_trains(make_cfg):
    metrics = train(make_cfg("trainer.compile=true", "trainer.max_epochs=1"))
    assert math.isfinite(metrics["val/rmse"])


def test_grad_checkpointing_finds_transformer_blocks(make_cfg):
    cfg = make_cfg("model=ft_transformer", "model.d_block=16", "model.n_blocks=2", "model.attention_n_heads=2")
    a = instantiate(cfg.model, n_num=3, cat_cardinalities=[], d_out=1)
    b = copy.deepcopy(a)
    assert enable_grad_checkpointing(b) == 2
    x = torch.randn(8, 3)
    for m in (a, b):
        torch.manual_seed(1)
        m(x).pow(2).sum().backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None and q.grad is None) or torch.allclose(p.grad, q.grad, atol=1e-6), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_mixed_precision_trains(make_cfg, precision):
    metrics = train(make_cfg("trainer.device=cuda", f"trainer.precision={precision}"))
    assert math.isfinite(metrics["val/rmse"])


def test_grad_checkpointing_is_the_models_own_and_survives_averagings_copy(make_cfg):
    """No callback position to get right: the flag is the model's, so EMA's copy of the model keeps it, and a run
    with it matches one without (same seeds, dropout replayed in the recomputation)."""
    plain = train(make_cfg("averaging=ema", "model.dropout=0.1"))
    checkpointed = train(make_cfg("averaging=ema", "model.dropout=0.1", "trainer.grad_checkpointing=true"))
    assert checkpointed["val/rmse"] == pytest.approx(plain["val/rmse"], rel=1e-5)
    model = mlp(dropout=0.1)
    assert model.set_grad_checkpointing() == len(model.blocks) and copy.deepcopy(model).grad_checkpointing
