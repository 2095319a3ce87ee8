"""DenseNet for tabular data: every layer sees the concatenation of all earlier layers' outputs (Huang et al. 2017,
https://arxiv.org/abs/1608.06993), with fully connected layers in place of convolutions."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vforge.layers.dropout import Dropout
from vforge.layers.embeddings import FlatInput
from vforge.models.base import Model


class DenseLayer(nn.Module):
    """[x, Dropout(Linear(ReLU(BN(x))))]: appends ``growth`` new features. Shape: (batch, d) -> (batch, d + growth)."""

    def __init__(self, d_in: int, growth: int, dropout: float) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.BatchNorm1d(d_in), nn.ReLU(), nn.Linear(d_in, growth), Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.f(x)], dim=1)


class DenseNet(Model):
    """Linear -> n_blocks x [n_layers dense layers -> transition (BN -> ReLU -> Linear compressing the width)]
    -> BN -> ReLU -> Linear.

    Args:
        d_first: the width after the input layer.
        growth: features each dense layer adds (the growth rate k).
        compression: the transition keeps this fraction of the width (DenseNet-BC's theta).

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) | None
        returns: (batch, d_out)
    """

    def __init__(self, *, n_num: int, cat_cardinalities: list[int], d_out: int, n_blocks: int, n_layers: int,
                 d_first: int, growth: int, compression: float, dropout: float) -> None:
        super().__init__()
        if n_blocks < 1 or n_layers < 1:
            raise ValueError(f"n_blocks and n_layers must be >= 1, got {n_blocks=}, {n_layers=}")
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression=}")
        self.input = FlatInput(n_num, cat_cardinalities)
        self.first = nn.Linear(self.input.d_out, d_first)
        layers: list[nn.Module] = []
        d = d_first
        for _ in range(n_blocks):
            for _ in range(n_layers):
                layers.append(DenseLayer(d, growth, dropout))
                d += growth
            d_next = max(int(d * compression), 1)
            layers.append(nn.Sequential(nn.BatchNorm1d(d), nn.ReLU(), nn.Linear(d, d_next)))  # transition
            d = d_next
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.BatchNorm1d(d), nn.ReLU(), nn.Linear(d, d_out))

    def forward(self, x_num: Tensor, x_cat: Tensor | None = None) -> Tensor:
        return self.head(self.run_blocks(self.blocks, self.first(self.input(x_num, x_cat))))

    def checkpoint_blocks(self) -> nn.Sequential:
        return self.blocks
