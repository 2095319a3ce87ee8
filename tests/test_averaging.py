"""EMA, Polyak and SWA against hand-computed averages; BN statistics; averaged weights are what gets saved."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vforge.train import train
from vforge.training.averaging import EMA, SWA, Polyak, has_batch_norm
from vforge.training.state import FitState

# the unit tests step SWALR without optimizer steps, which torch warns about
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")


class Scalar(nn.Module):
    """One parameter we set by hand; forward(x_num, x_cat) -> (batch, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x_num, x_cat=None):
        return x_num[:, :1] * self.w


def make_state(model: nn.Module, max_epochs: int = 4, steps_per_epoch: int = 5, data=None) -> FitState:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return FitState(model, data, opt, None, max_epochs, batch_size=4, steps_per_epoch=steps_per_epoch)


def run_steps(avg, state: FitState, values: list[float]) -> None:
    for v in values:
        with torch.no_grad():
            state.model.w.fill_(v)
        state.step += 1
        avg.on_step_end(state)


def test_ema_matches_the_recursion():
    state = make_state(Scalar())
    ema = EMA(decay=0.9)
    ema.on_fit_start(state)
    assert state.eval_model is state.model  # nothing averaged yet: raw weights are evaluated
    run_steps(ema, state, [1.0, 2.0, 4.0])
    expected = 1.0  # first update copies
    for v in (2.0, 4.0):
        expected = 0.9 * expected + 0.1 * v
    assert state.eval_model is ema.averaged.module
    assert state.eval_model.w.item() == pytest.approx(expected)
    assert state.model.w.item() == 4.0  # the raw weights are untouched


def test_polyak_is_the_uniform_mean_after_the_start():
    state = make_state(Scalar(), max_epochs=1, steps_per_epoch=4)
    polyak = Polyak(start_fraction=0.5)  # start after step 2 of 4
    polyak.on_fit_start(state)
    run_steps(polyak, state, [10.0, 20.0, 1.0, 3.0])
    assert state.eval_model.w.item() == pytest.approx((1.0 + 3.0) / 2)
    assert int(polyak.averaged.n_averaged) == 2


def test_swa_averages_epoch_ends_and_anneals_the_lr():
    state = make_state(Scalar(), max_epochs=4)
    state.scheduler = torch.optim.lr_scheduler.LambdaLR(state.optimizer, lambda s: 1.0)
    swa = SWA(swa_lr=0.01, start_fraction=0.5, anneal_epochs=2, anneal_strategy="linear")
    swa.on_fit_start(state)
    lrs = []
    for epoch, v in enumerate([5.0, 7.0, 1.0, 2.0]):
        state.epoch = epoch
        with torch.no_grad():
            state.model.w.fill_(v)
        swa.on_train_epoch_end(state)
        lrs.append(state.optimizer.param_groups[0]["lr"])
    assert state.eval_model.w.item() == pytest.approx((1.0 + 2.0) / 2)  # epochs 2 and 3
    assert state.scheduler is None  # SWALR took over the learning rate
    assert lrs[:2] == [0.1, 0.1] and lrs[2] == pytest.approx(0.1 * 0.5 + 0.01 * 0.5) and lrs[3] == pytest.approx(0.01)


def test_swa_state_round_trips_without_moving_the_lr():
    def fresh():
        state = make_state(Scalar(), max_epochs=4)
        swa = SWA(swa_lr=0.01, start_fraction=0.25, anneal_epochs=3)  # average epochs 1, 2, ...
        swa.on_fit_start(state)
        return state, swa

    state, swa = fresh()
    for epoch in range(3):
        state.epoch = epoch
        with torch.no_grad():
            state.model.w.fill_(float(epoch))
        swa.on_train_epoch_end(state)
    saved, opt_saved = swa.state_dict(), state.optimizer.state_dict()
    state2, swa2 = fresh()
    state2.optimizer.load_state_dict(opt_saved)
    swa2.load_state_dict(saved)
    assert state2.optimizer.param_groups[0]["lr"] == state.optimizer.param_groups[0]["lr"]
    assert state2.eval_model.w.item() == state.eval_model.w.item() == pytest.approx(1.5)
    state.epoch = state2.epoch = 3
    swa.on_train_epoch_end(state)
    swa2.on_train_epoch_end(state2)
    assert state2.optimizer.param_groups[0]["lr"] == pytest.approx(state.optimizer.param_groups[0]["lr"])


class BNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(2)
        self.head = nn.Linear(2, 1)

    def forward(self, x_num, x_cat=None):
        return self.head(self.bn(x_num))


def test_update_bn_recomputes_the_averaged_models_statistics():
    class Data:
        class train:  # noqa: N801 - a stand-in for Split
            x_num = torch.randn(64, 2) * torch.tensor([2.0, 0.5]) + torch.tensor([3.0, -1.0])
            x_cat = None

    model = BNModel()
    assert has_batch_norm(model)
    state = make_state(model, data=Data)
    state.batch_size = 16  # 4 equal batches: the cumulative BN mean is the data mean
    polyak = Polyak()
    polyak.on_fit_start(state)
    run_steps_bn = lambda: (setattr(state, "step", state.step + 1), polyak.on_step_end(state))  # noqa: E731
    run_steps_bn()
    polyak.on_train_epoch_end(state)
    assert torch.allclose(state.eval_model.bn.running_mean, Data.train.x_num.mean(0), atol=1e-5)
    assert torch.allclose(model.bn.running_mean, torch.zeros(2))  # the raw model's statistics are not touched


def test_ema_run_logs_raw_and_averaged_and_saves_the_averaged_weights(make_cfg):
    cfg = make_cfg("averaging=ema", "averaging.decay=0.9", "do_no_harm.enabled=false")  # model.pt: the averaged net itself
    metrics = train(cfg)
    assert math.isfinite(metrics["val/raw_rmse"]) and metrics["val/raw_rmse"] != metrics["val/rmse"]
    saved = torch.load(Path(cfg.output_dir) / "model.pt", weights_only=False)
    best = torch.load(Path(cfg.output_dir) / "checkpoints" / "best.pt", weights_only=False)
    for k, v in saved["state_dict"].items():
        assert torch.equal(v, best["model"][k]), k
    last = torch.load(Path(cfg.output_dir) / "checkpoints" / "last.pt", weights_only=False)
    averaged = last["callbacks"]["averaging"]["averaged"]
    assert int(averaged["n_averaged"]) > 1


@pytest.mark.parametrize("option", ["swa", "polyak"])
def test_swa_and_polyak_train_a_batchnorm_resnet(make_cfg, option):
    metrics = train(make_cfg("model=resnet", "model.d_block=16", "model.n_blocks=1", f"averaging={option}",
                             "trainer.max_epochs=3"))
    assert np.isfinite([metrics["val/rmse"], metrics["val/raw_rmse"], metrics["test/rmse"]]).all()


def test_averaging_rejects_bad_settings():
    with pytest.raises(ValueError, match="decay must be in"):
        EMA(decay=1.0)
    with pytest.raises(ValueError, match="start_fraction must be in"):
        Polyak(start_fraction=1.0)
