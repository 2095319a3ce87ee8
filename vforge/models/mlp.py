"""Multilayer perceptron: the baseline of Gorishniy et al. 2021 (https://arxiv.org/abs/2106.11959)."""

from __future__ import annotations

from torch import Tensor, nn

from vforge.layers.activations import get_activation
from vforge.layers.embeddings import FlatInput


class MLP(nn.Module):
    """(Linear -> activation -> dropout) x n_blocks -> Linear.

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) | None
        returns: (batch, d_out)
    """

    def __init__(self, *, n_num: int, cat_cardinalities: list[int], d_out: int, n_blocks: int, d_block: int,
                 dropout: float, activation: str = "relu") -> None:
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n_blocks=}")
        self.input = FlatInput(n_num, cat_cardinalities)
        layers: list[nn.Module] = []
        d_in = self.input.d_out
        for _ in range(n_blocks):
            layers += [nn.Linear(d_in, d_block), get_activation(activation), nn.Dropout(dropout)]
            d_in = d_block
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(d_block, d_out)

    def forward(self, x_num: Tensor, x_cat: Tensor | None = None) -> Tensor:
        return self.head(self.blocks(self.input(x_num, x_cat)))
