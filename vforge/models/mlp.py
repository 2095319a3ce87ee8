"""Multilayer perceptrons: the baseline of Gorishniy et al. 2021 (https://arxiv.org/abs/2106.11959), with optional
numerical embeddings (``model=mlp_plr``: MLP-PLR of Gorishniy et al. 2022, https://arxiv.org/abs/2203.05556), and a
residual MLP of gated feed-forward blocks (``model=glu_mlp``: SwiGLU/GeGLU of Shazeer 2020,
https://arxiv.org/abs/2002.05202)."""

from __future__ import annotations

from torch import Tensor, nn

from vforge.layers.activations import GLU_ACTIVATIONS, get_activation, glu_factor
from vforge.layers.blocks import FeedForward
from vforge.layers.dropout import Dropout
from vforge.layers.embeddings import FlatInput
from vforge.layers.norms import get_norm
from vforge.models.base import Model


class MLP(Model):
    """(Linear -> activation -> dropout) x n_blocks -> Linear.

    Args:
        activation: any name from vforge.layers.activations (a GLU doubles the Linear before it).
        num_embeddings: null feeds the numeric features as they are; linear, periodic (MLP-PLR) or piecewise_linear
            embeds each into ``d_num_embedding`` values first.
        num_embeddings_options: extra arguments of the embeddings (e.g. sigma, n_frequencies, lite).

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) | None
        returns: (batch, d_out)
    """

    def __init__(self, *, n_num: int, cat_cardinalities: list[int], d_out: int, n_blocks: int, d_block: int,
                 dropout: float, activation: str = "relu", num_embeddings: str | None = None,
                 d_num_embedding: int | None = None, num_embeddings_options: dict | None = None) -> None:
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n_blocks=}")
        self.input = FlatInput(n_num, cat_cardinalities, num_embeddings=num_embeddings,
                               d_num_embedding=d_num_embedding, num_embeddings_options=num_embeddings_options)
        layers: list[nn.Module] = []
        d_in = self.input.d_out
        for _ in range(n_blocks):
            layers += [nn.Linear(d_in, d_block * glu_factor(activation)), get_activation(activation, d_block),
                       Dropout(dropout)]
            d_in = d_block
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(d_block, d_out)

    def forward(self, x_num: Tensor, x_cat: Tensor | None = None) -> Tensor:
        return self.head(self.run_blocks(self.blocks, self.input(x_num, x_cat)))

    def checkpoint_blocks(self) -> nn.Sequential:
        return self.blocks


class GLUMLP(Model):
    """Linear -> n_blocks x [x + Dropout(W2 GLU(W1 norm(x)))] -> norm -> Linear: the gated feed-forward block of
    modern transformers, stacked as a residual MLP.

    Args:
        activation: swiglu, geglu or reglu.
        d_hidden_multiplier: the GLU's output width over d_block (2/3 of a plain FFN's keeps the parameter count).

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) | None
        returns: (batch, d_out)
    """

    def __init__(self, *, n_num: int, cat_cardinalities: list[int], d_out: int, n_blocks: int, d_block: int,
                 d_hidden_multiplier: float, dropout: float, residual_dropout: float, activation: str = "swiglu",
                 norm: str = "rmsnorm") -> None:
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n_blocks=}")
        if activation.lower() not in GLU_ACTIVATIONS:
            raise ValueError(f"glu_mlp needs a gated activation, one of {sorted(GLU_ACTIVATIONS)}; got {activation=}")
        self.input = FlatInput(n_num, cat_cardinalities)
        self.first = nn.Linear(self.input.d_out, d_block)
        d_hidden = int(d_block * d_hidden_multiplier)
        self.norms = nn.ModuleList(get_norm(norm, d_block) for _ in range(n_blocks))
        self.ffns = nn.ModuleList(FeedForward(d_block, d_hidden, activation=activation, dropout=dropout)
                                  for _ in range(n_blocks))
        self.residual_dropout = Dropout(residual_dropout)
        self.head = nn.Sequential(get_norm(norm, d_block), nn.Linear(d_block, d_out))

    def forward(self, x_num: Tensor, x_cat: Tensor | None = None) -> Tensor:
        x = self.first(self.input(x_num, x_cat))
        for norm, ffn in zip(self.norms, self.ffns, strict=True):
            x = x + self.residual_dropout(ffn(norm(x)))
        return self.head(x)
