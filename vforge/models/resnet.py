"""Residual networks for tabular data: the ResNet of Gorishniy et al. 2021 (https://arxiv.org/abs/2106.11959), a
modern pre-norm variant with stochastic depth and LayerScale (``model=modern_resnet``), and a pyramidal one whose
width grows block by block (``model=pyramid_resnet``; Han et al. 2017, https://arxiv.org/abs/1610.02915)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from vforge.layers.activations import get_activation
from vforge.layers.blocks import DropPath, FeedForward
from vforge.layers.dropout import Dropout
from vforge.layers.embeddings import FlatInput
from vforge.layers.norms import LayerScale, get_norm
from vforge.models.base import Model


class ResNetBlock(nn.Module):
    """x + Dropout(Linear(Dropout(ReLU(Linear(BatchNorm(x))))))."""

    def __init__(self, d_block: int, d_hidden: int, dropout1: float, dropout2: float) -> None:
        super().__init__()
        self.f = nn.Sequential(
            nn.BatchNorm1d(d_block), nn.Linear(d_block, d_hidden), nn.ReLU(), Dropout(dropout1),
            nn.Linear(d_hidden, d_block), Dropout(dropout2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.f(x)


class ResNet(Model):
    """Linear -> ResNetBlock x n_blocks -> BatchNorm -> ReLU -> Linear.

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) | None
        returns: (batch, d_out)
    """

    def __init__(self, *, n_num: int, cat_cardinalities: list[int], d_out: int, n_blocks: int, d_block: int,
                 d_hidden_multiplier: float, dropout1: float, dropout2: float) -> None:
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n_blocks=}")
        self.input = FlatInput(n_num, cat_cardinalities)
        self.first = nn.Linear(self.input.d_out, d_block)
        d_hidden = int(d_block * d_hidden_multiplier)
        self.blocks = nn.Sequential(*(ResNetBlock(d_block, d_hidden, dropout1, dropout2) for _ in range(n_blocks)))
        self.head = nn.Sequential(nn.BatchNorm1d(d_block), nn.ReLU(), nn.Linear(d_block, d_out))

    def forward(self, x_num: Tensor, x_cat: Tensor | None = None) -> Tensor:
        return self.head(self.run_blocks(self.blocks, self.first(self.input(x_num, x_cat))))

    def checkpoint_blocks(self) -> nn.Sequential:
        return self.blocks


class ModernResNetBlock(nn.Module):
    """x + DropPath(LayerScale(Dropout(FFN(norm(x))))): pre-norm, as in ConvNeXt / CaiT-style residual stacks."""

    def __init__(self, d_block: int, d_hidden: int, *, norm: str, activation: str, dropout: float,
                 residual_dropout: float, drop_path: float, layer_scale_init: float | None) -> None:
        super().__init__()
        self.norm = get_norm(norm, d_block)
        self.ffn = FeedForward(d_block, d_hidden, activation=activation, dropout=dropout)
        self.residual_dropout = Dropout(residual_dropout)
        self.scale = LayerScale(d_block, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.scale(self.residual_dropout(self.ffn(self.norm(x)))))


class ModernResNet(Model):
    """Linear -> pre-norm residual FFN blocks with stochastic depth (rising linearly to ``drop_path``) and LayerScale
    -> norm -> activation -> Linear.

    Args:
        norm: layernorm, rmsnorm, batchnorm, ... (vforge.layers.norms.NORMS).
        activation: any name from vforge.layers.activations, GLUs included.
        drop_path: the stochastic-depth rate of the last block (Huang et al. 2016).
        layer_scale_init: the initial LayerScale (Touvron et al. 2021); null turns it off.

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) | None
        returns: (batch, d_out)
    """

    def __init__(self, *, n_num: int, cat_cardinalities: list[int], d_out: int, n_blocks: int, d_block: int,
                 d_hidden_multiplier: float, dropout: float, residual_dropout: float, drop_path: float,
                 layer_scale_init: float | None, norm: str = "layernorm", activation: str = "gelu") -> None:
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n_blocks=}")
        self.input = FlatInput(n_num, cat_cardinalities)
        self.first = nn.Linear(self.input.d_out, d_block)
        d_hidden = int(d_block * d_hidden_multiplier)
        self.blocks = nn.Sequential(*(
            ModernResNetBlock(d_block, d_hidden, norm=norm, activation=activation, dropout=dropout,
                              residual_dropout=residual_dropout, drop_path=drop_path * i / max(n_blocks - 1, 1),
                              layer_scale_init=layer_scale_init)
            for i in range(n_blocks)))
        self.head = nn.Sequential(get_norm(norm, d_block), get_activation("relu"), nn.Linear(d_block, d_out))

    def forward(self, x_num: Tensor, x_cat: Tensor | None = None) -> Tensor:
        return self.head(self.run_blocks(self.blocks, self.first(self.input(x_num, x_cat))))

    def checkpoint_blocks(self) -> nn.Sequential:
        return self.blocks


class PyramidBlock(nn.Module):
    """Pad(x, d_out) + BN(Linear(Dropout(ReLU(Linear(BN(x)))))) with d_out >= d_in: PyramidNet's block, whose
    shortcut zero-pads the new channels instead of projecting them (no extra parameters on the identity path)."""

    def __init__(self, d_in: int, d_out: int, d_hidden: int, dropout: float) -> None:
        super().__init__()
        self.d_pad = d_out - d_in
        self.f = nn.Sequential(nn.BatchNorm1d(d_in), nn.Linear(d_in, d_hidden), nn.ReLU(), Dropout(dropout),
                               nn.Linear(d_hidden, d_out), nn.BatchNorm1d(d_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, (0, self.d_pad)) + self.f(x)


class PyramidResNet(Model):
    """Linear -> residual blocks whose width rises linearly from ``d_first`` to ``d_last`` -> BN -> ReLU -> Linear:
    narrow early features, wide late ones (multi-scale widths at one parameter budget).

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) | None
        returns: (batch, d_out)
    """

    def __init__(self, *, n_num: int, cat_cardinalities: list[int], d_out: int, n_blocks: int, d_first: int,
                 d_last: int, d_hidden_multiplier: float, dropout: float) -> None:
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n_blocks=}")
        if not 1 <= d_first <= d_last:
            raise ValueError(f"widths must grow: need 1 <= d_first <= d_last, got {d_first=}, {d_last=}")
        self.input = FlatInput(n_num, cat_cardinalities)
        self.first = nn.Linear(self.input.d_out, d_first)
        widths = [round(d_first + (d_last - d_first) * i / n_blocks) for i in range(n_blocks + 1)]
        self.blocks = nn.Sequential(*(PyramidBlock(a, b, int(b * d_hidden_multiplier), dropout)
                                      for a, b in zip(widths[:-1], widths[1:], strict=True)))
        self.head = nn.Sequential(nn.BatchNorm1d(d_last), nn.ReLU(), nn.Linear(d_last, d_out))

    def forward(self, x_num: Tensor, x_cat: Tensor | None = None) -> Tensor:
        return self.head(self.run_blocks(self.blocks, self.first(self.input(x_num, x_cat))))

    def checkpoint_blocks(self) -> nn.Sequential:
        return self.blocks
