"""vforge.models.residual.OnRidge: the ridge solved before training and frozen, the network a correction from zero."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vforge.models.linear import Ridge
from vforge.models.residual import OnRidge
from vforge.serving import ModelBundle

MLP = {"_target_": "vforge.models.mlp.MLP", "n_blocks": 1, "d_block": 16, "dropout": 0.0}


def split(seed: int = 0, n_dates: int = 30, per_date: int = 50) -> SimpleNamespace:
    """A training split whose target is an interaction the ridge holds plus a sine it cannot."""
    g = np.random.default_rng(seed)
    x = torch.tensor(g.standard_normal((n_dates * per_date, 3)), dtype=torch.float32)
    y = 0.5 * x[:, 0] - 0.3 * x[:, 1] * x[:, 2] + 0.4 * torch.sin(3 * x[:, 0])
    return SimpleNamespace(x_num=x, x_cat=None, y=y[:, None],
                           aux={"quote_date_idx": torch.as_tensor(np.repeat(np.arange(n_dates), per_date))})


def test_prepared_model_is_the_ridge_solved_on_train_exactly_and_the_ridge_is_frozen():
    train = split()
    model = OnRidge(n_num=3, cat_cardinalities=[], d_out=1, model=MLP)
    info = model.prepare(SimpleNamespace(train=train))
    alone = Ridge(n_num=3, cat_cardinalities=[], d_out=1)
    assert alone.fit_closed_form(train.x_num, None, train.y, train.aux["quote_date_idx"].numpy())["alpha"] == info["alpha"]
    with torch.no_grad():
        torch.testing.assert_close(model(train.x_num, None), alone(train.x_num, None), rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.linear.parameters())


def test_training_moves_the_correction_only_and_it_learns_what_the_ridge_leaves():
    train = split()
    model = OnRidge(n_num=3, cat_cardinalities=[], d_out=1, model=MLP)
    model.prepare(SimpleNamespace(train=train))
    ridge_before = {k: v.clone() for k, v in model.linear.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def mse() -> float:
        with torch.no_grad():
            return float(torch.mean((model(train.x_num, None) - train.y) ** 2))

    start = mse()
    for _ in range(300):
        opt.zero_grad()
        out, aux = model.forward_train(train.x_num, None)
        assert aux is None
        torch.mean((out - train.y) ** 2).backward()
        assert model.linear.weight.grad is None
        opt.step()
    for k, v in model.linear.state_dict().items():
        torch.testing.assert_close(v, ridge_before[k], rtol=0, atol=0)
    assert mse() < 0.5 * start  # the sine the ridge could not hold


def test_a_saved_on_ridge_rebuilds_with_its_ridge_and_predicts_the_same():
    train = split(seed=1)
    cfg = {"_target_": "vforge.models.residual.OnRidge", "_recursive_": False, "model": MLP}
    model = OnRidge(n_num=3, cat_cardinalities=[], d_out=1, model=MLP)
    model.prepare(SimpleNamespace(train=train))
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(0.01)
    bundle = ModelBundle(state_dict=model.state_dict(), config={"model": cfg}, feature_names=["a", "b", "c"],
                         x_mean=np.zeros(3), x_std=np.ones(3), y_center=0.0, y_scale=1.0, target="change")
    rebuilt = ModelBundle.from_dict(bundle.to_dict()).build_model()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(train.x_num, None), model.eval()(train.x_num, None))


def test_the_linear_part_must_be_a_ridge():
    with pytest.raises(ValueError, match="must be a vforge.models.linear.Ridge"):
        OnRidge(n_num=3, cat_cardinalities=[], d_out=1, model=MLP, linear=MLP)


def test_grad_checkpointing_acts_on_the_network_inside_and_gives_the_same_gradients():
    import copy

    from vforge.models.base import enable_grad_checkpointing

    train = split(seed=2)
    mlp = dict(MLP, n_blocks=2, dropout=0.2)
    a = OnRidge(n_num=3, cat_cardinalities=[], d_out=1, model=mlp)
    a.prepare(SimpleNamespace(train=train))
    with torch.no_grad():
        for p in a.model.parameters():
            p.add_(0.05)
    b = copy.deepcopy(a)
    assert enable_grad_checkpointing(b) == len(b.model.blocks) and b.model.grad_checkpointing and not a.model.grad_checkpointing
    for m in (a, b):
        torch.manual_seed(1)
        m.forward_train(train.x_num[:16], None)[0].pow(2).sum().backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None and q.grad is None) or torch.allclose(p.grad, q.grad, atol=1e-6), name
