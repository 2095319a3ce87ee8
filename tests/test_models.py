"""Every conf/model/*.yaml: built from the composed config, forward/backward, gradients, state_dict round trip, fit.

A new model is tested by adding its YAML; nothing here names the models except the family-specific checks at the end.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from tests.conftest import CONF_DIR

MODELS = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml") if not p.stem.startswith("_"))
N_NUM, CATS = 5, [3, 4]
# For the fitting test only: shrink whatever size keys a model has, so a few hundred steps take about a second.
SMALL = {"d_block": 32, "n_blocks": 2, "k": 8, "d_first": 32, "d_last": 64, "growth": 16, "n_d": 8, "n_a": 8,
         "n_steps": 3, "n_layers": 2, "d_num_embedding": 8}


@pytest.fixture
def build(make_cfg):
    """``build(name, cats, **overrides)`` instantiates the shipped conf/model/<name>.yaml through the composed config."""

    def _build(name: str, cats: list[int], seed: int = 0, small: bool = False, **overrides) -> torch.nn.Module:
        cfg = make_cfg(f"model={name}")
        with open_dict(cfg):
            for key, value in overrides.items():
                cfg.model[key] = value
            if small:
                for key, value in SMALL.items():
                    if key in cfg.model and cfg.model[key] is not None:
                        cfg.model[key] = min(cfg.model[key], value)
        torch.manual_seed(seed)
        return instantiate(cfg.model, n_num=N_NUM, cat_cardinalities=cats, d_out=1)

    return _build


def _inputs(batch: int, cats: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x_num = torch.randn(batch, N_NUM, generator=g)
    x_cat = torch.stack([torch.randint(0, c, (batch,), generator=g) for c in cats], 1) if cats else None
    return x_num, x_cat


def _loss(out: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
    """A training loss on the model's training forward (``Model.forward_train``): its auxiliary loss added."""
    loss = out.square().mean()
    return loss + aux if aux is not None else loss


@pytest.mark.parametrize("cats", [[], CATS], ids=["num", "num+cat"])
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_gradients(build, name, cats):
    model = build(name, cats)
    for batch, train in ((64, True), (1, False)):  # a single row predicts in eval mode (BatchNorm needs 2 to train)
        model.train(train)
        model.zero_grad(set_to_none=True)
        out, aux = model.forward_train(*_inputs(batch, cats))
        assert out.shape == (batch, 1)
        assert torch.isfinite(out).all(), f"NaN/inf in the output of {name}"
        _loss(out, aux).backward()
        for pname, p in model.named_parameters():
            if not p.requires_grad:  # frozen by design (OnRidge's ridge, solved before training): tested in its file
                assert p.grad is None, f"a gradient for the frozen {pname}"
                continue
            assert p.grad is not None, f"no gradient for {pname}"
            assert torch.isfinite(p.grad).all(), f"non-finite gradient for {pname}"
        if train:
            assert any(p.grad.abs().sum() > 0 for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip(build, name, tmp_path):
    model = build(name, CATS, seed=0)
    x = _inputs(64, CATS)
    model.train()
    model(*x)  # move BatchNorm running statistics away from their initial values
    model.eval()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    clone = build(name, CATS, seed=123).eval()
    assert not torch.equal(clone(*x), model(*x))
    clone.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(clone(*x), model(*x), rtol=0, atol=0)
    assert copy.deepcopy(model) is not None  # EMA/SWA copy models after a forward pass


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_fits_a_smooth_function(build, name):
    """300 Adam steps on y = sin(2 x0) + x1 x2 / 2 + x3^2 / 4 (a smooth surface over 5 inputs): the training MSE
    falls at least 5x from its start."""
    model = build(name, [], small=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, N_NUM, generator=g)
    y = torch.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] / 2 + x[:, 3] ** 2 / 4
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()

    def mse() -> float:
        model.eval()
        with torch.no_grad():
            value = (model(x, None)[:, 0] - y).square().mean().item()
        model.train()
        return value

    start = mse()
    for _ in range(300):
        idx = torch.randint(0, len(x), (128,), generator=g)
        out, aux = model.forward_train(x[idx], None)
        loss = (out[:, 0] - y[idx]).square().mean()
        if aux is not None:
            loss = loss + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = mse()
    if name == "linear":  # a ridge on 1, x and x_i x_j cannot hold sin(2 x0): it must reach its basis' least squares
        i, j = torch.triu_indices(N_NUM, N_NUM)
        z = torch.cat([torch.ones(len(x), 1), x, x[:, i] * x[:, j]], 1).double()
        floor = (z @ torch.linalg.lstsq(z, y.double().unsqueeze(1)).solution - y.double().unsqueeze(1)).square().mean()
        assert end < 1.05 * floor.item() < start / 2, f"linear: MSE {start:.3f} -> {end:.3f}, least squares {floor:.3f}"
        return
    assert end < start / 5, f"{name}: MSE {start:.3f} -> {end:.3f}, expected a 5x drop"


# --- family-specific checks ----------------------------------------------------------------------------------------

def test_tabnet_masks_sum_to_at_most_one_per_feature_with_gamma_one(build):
    model = build("tabnet", CATS, gamma=1.0)
    x = _inputs(64, CATS)
    model.train()
    for _ in range(3):  # a few updates so the masks are not at their initial values
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        _loss(*model.forward_train(*x)).backward()
        opt.step()
    model.eval()
    masks = model.masks(*x)  # (n_steps, batch, d_in)
    assert masks.shape[0] == model.n_steps and (masks >= 0).all()
    assert (masks.sum(0) <= 1 + 1e-6).all()
    assert (masks.sum(-1) <= 1 + 1e-6).all()  # each step's mask is within the simplex
    # A large gamma never shrinks the prior: every step's mask is a full simplex point, features are reused.
    relaxed = build("tabnet", CATS, gamma=10.0).eval().masks(*x)
    torch.testing.assert_close(relaxed.sum(-1), torch.ones(relaxed.shape[:2]))


def test_tabnet_auxiliary_loss_and_importances(build):
    model = build("tabnet", CATS, lambda_sparse=0.5).train()
    x = _inputs(64, CATS)
    _, aux = model.forward_train(*x)
    m = model.masks(*x)
    assert aux.requires_grad and aux.item() > 0
    # lambda * mean entropy; masks() reruns the same train-mode forward (same ghost batches), so the values agree
    torch.testing.assert_close(aux.detach(), 0.5 * -(m * torch.log(m + 1e-15)).sum(-1).mean(), rtol=1e-4, atol=1e-6)
    imp = model.eval().feature_importances(*x)
    assert imp.shape == (64, N_NUM + len(CATS)) and (imp >= 0).all()
    torch.testing.assert_close(imp.sum(1), torch.ones(64))
    sparse = build("tabnet", CATS, mask="entmax15").eval()
    assert sparse(*x).shape == (64, 1)


def test_hybrid_transformer_alternates_linear_and_softmax_attention(build):
    from vforge.layers.attention import LinearAttention

    model = build("transformer_hybrid", [], n_blocks=4)
    kinds = [isinstance(block.attention, LinearAttention) for block in model.backbone.blocks]
    assert kinds == [True, False, True, False]
    with pytest.raises(Exception, match="alternates linear with a softmax attention"):
        build("transformer_hybrid", [], attention="linear")


def test_transformer_attention_is_selectable_from_config(build):
    from vforge.layers.attention import SlidingWindowAttention

    model = build("transformer", [], attention="sliding_window", attention_n_kv_heads=None, attention_window=2)
    assert all(isinstance(b.attention, SlidingWindowAttention) for b in model.backbone.blocks)
    with pytest.raises(Exception, match=r"unknown attention 'gqa'; valid names"):
        build("transformer", [], attention="gqa")


def test_ft_transformer_checks_heads_and_last_block_reads_only_cls(build):
    with pytest.raises(Exception, match=r"d_block must be a multiple of attention_n_heads, got d_block=60"):
        build("ft_transformer", [], d_block=60)
    model = build("ft_transformer", CATS).eval()
    x = _inputs(8, CATS)
    tokens = model.tokenizer(*x)
    full = tokens
    for block in model.backbone.blocks:
        full = block(full)  # every token through every block
    torch.testing.assert_close(model.backbone(tokens), full[:, 0], atol=1e-5, rtol=1e-4)


def test_saint_predicts_single_rows_and_mixes_rows_in_a_batch(build):
    model = build("saint", CATS).eval()
    x_num, x_cat = _inputs(16, CATS)
    batch = model(x_num, x_cat)
    single = torch.cat([model(x_num[i : i + 1], x_cat[i : i + 1]) for i in range(16)])
    assert single.shape == (16, 1) and torch.isfinite(single).all()
    assert not torch.allclose(batch, single), "intersample attention should let rows see each other"
    alone = build("saint", CATS, intersample=False).eval()
    torch.testing.assert_close(
        alone(x_num, x_cat), torch.cat([alone(x_num[i : i + 1], x_cat[i : i + 1]) for i in range(16)]))


def test_tabm_is_the_mean_of_its_members(build):
    model = build("tabm", CATS).eval()
    x = _inputs(8, CATS)
    members = model.members(*x)
    assert members.shape == (8, model.k, 1)
    torch.testing.assert_close(model(*x), members.mean(1))
    assert members.std(1).min() > 0, "members should differ"


def test_glu_mlp_rejects_a_plain_activation(build):
    with pytest.raises(Exception, match=r"glu_mlp needs a gated activation"):
        build("glu_mlp", [], activation="relu")
