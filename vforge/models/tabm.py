"""TabM of Gorishniy et al. 2024 (https://arxiv.org/abs/2410.24210): an MLP that is a parameter-efficient ensemble
of k members sharing their weights (BatchEnsemble, Wen et al. 2020, https://arxiv.org/abs/2002.06715)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vforge.layers.dropout import Dropout
from vforge.layers.embeddings import FlatInput
from vforge.models.base import Model


class LinearBatchEnsemble(nn.Module):
    """k linear maps sharing one weight W: member m computes ((x * r_m) @ W) * s_m + b_m.

    ``scale_input``/``scale_output`` turn the adapters r / s off (TabM-mini keeps only the first layer's r).
    ``random_signs`` initialises r with random +-1 (the members differ from the start), else ones.

    Shape:
        x: (batch, k, d_in)
        returns: (batch, k, d_out)
    """

    def __init__(self, d_in: int, d_out: int, k: int, *, scale_input: bool = True, scale_output: bool = True,
                 random_signs: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=False)
        r = torch.randint(0, 2, (k, d_in)).float() * 2 - 1 if random_signs else torch.ones(k, d_in)
        self.r = nn.Parameter(r) if scale_input else None
        self.s = nn.Parameter(torch.ones(k, d_out)) if scale_output else None
        bound = d_in**-0.5
        self.bias = nn.Parameter(torch.empty(k, d_out).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        if self.r is not None:
            x = x * self.r
        x = self.linear(x)
        if self.s is not None:
            x = x * self.s
        return x + self.bias


class TabM(Model):
    """Input (optionally PLR-embedded) copied to k members -> n_blocks x [BatchEnsemble Linear -> ReLU -> Dropout]
    -> one Linear head per member -> the mean over members.

    NOTE[paper]: the paper trains the k members with k separate losses and averages only at inference. vforge's loop
    sees one prediction per row, so here the loss is taken on the members' mean; the members still differ through
    their adapters and heads, but their diversity is weaker than in the paper.

    Args:
        k: the number of ensemble members.
        arch_type: tabm (adapters in every layer) or tabm_mini (only the first layer's input adapter).
        num_embeddings: null, or linear / periodic / piecewise_linear embeddings of the numeric features (TabM with
            PLR embeddings is the paper's strongest variant).

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) | None
        returns: (batch, d_out)
    """

    def __init__(self, *, n_num: int, cat_cardinalities: list[int], d_out: int, n_blocks: int, d_block: int,
                 dropout: float, k: int, arch_type: str = "tabm", num_embeddings: str | None = None,
                 d_num_embedding: int | None = None, num_embeddings_options: dict | None = None) -> None:
        super().__init__()
        if n_blocks < 1 or k < 1:
            raise ValueError(f"n_blocks and k must be >= 1, got {n_blocks=}, {k=}")
        if arch_type not in ("tabm", "tabm_mini"):
            raise ValueError(f"arch_type must be tabm or tabm_mini, got {arch_type=}")
        self.k = k
        self.input = FlatInput(n_num, cat_cardinalities, num_embeddings=num_embeddings,
                               d_num_embedding=d_num_embedding, num_embeddings_options=num_embeddings_options)
        full = arch_type == "tabm"
        layers: list[nn.Module] = []
        for i in range(n_blocks):
            layers += [LinearBatchEnsemble(d_block if i else self.input.d_out, d_block, k, scale_input=full or i == 0,
                                           scale_output=full, random_signs=i == 0),
                       nn.ReLU(), Dropout(dropout)]
        self.blocks = nn.Sequential(*layers)
        bound = d_block**-0.5
        self.head_weight = nn.Parameter(torch.empty(k, d_block, d_out).uniform_(-bound, bound))
        self.head_bias = nn.Parameter(torch.empty(k, d_out).uniform_(-bound, bound))

    def members(self, x_num: Tensor, x_cat: Tensor | None = None) -> Tensor:
        """Each member's prediction, (batch, k, d_out)."""
        x = self.input(x_num, x_cat)[:, None].expand(-1, self.k, -1)  # (batch, k, d_in)
        x = self.run_blocks(self.blocks, x)  # (batch, k, d_block)
        return torch.einsum("bkd,kdo->bko", x, self.head_weight) + self.head_bias

    def forward(self, x_num: Tensor, x_cat: Tensor | None = None) -> Tensor:
        return self.members(x_num, x_cat).mean(dim=1)

    def checkpoint_blocks(self) -> nn.Sequential:
        return self.blocks
