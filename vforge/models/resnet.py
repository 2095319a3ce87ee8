"""ResNet for tabular data of Gorishniy et al. 2021 (https://arxiv.org/abs/2106.11959)."""

from __future__ import annotations

from torch import Tensor, nn

from vforge.layers.embeddings import FlatInput


class ResNetBlock(nn.Module):
    """x + Dropout(Linear(Dropout(ReLU(Linear(BatchNorm(x))))))."""

    def __init__(self, d_block: int, d_hidden: int, dropout1: float, dropout2: float) -> None:
        super().__init__()
        self.f = nn.Sequential(
            nn.BatchNorm1d(d_block), nn.Linear(d_block, d_hidden), nn.ReLU(), nn.Dropout(dropout1),
            nn.Linear(d_hidden, d_block), nn.Dropout(dropout2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.f(x)


class ResNet(nn.Module):
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
        return self.head(self.blocks(self.first(self.input(x_num, x_cat))))
