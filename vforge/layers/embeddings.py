"""Feature embeddings shared by the models."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CategoricalEmbeddings(nn.Module):
    """One embedding table per categorical feature.

    Shape:
        x: (batch, n_cat) int64
        returns: (batch, n_cat, d_embedding)

    >>> CategoricalEmbeddings([3, 5], d_embedding=4)(torch.tensor([[0, 4]])).shape
    torch.Size([1, 2, 4])
    """

    def __init__(self, cardinalities: list[int], d_embedding: int) -> None:
        super().__init__()
        if not cardinalities:
            raise ValueError("cardinalities must be non-empty")
        self.embeddings = nn.ModuleList(nn.Embedding(c, d_embedding) for c in cardinalities)
        for emb in self.embeddings:
            nn.init.uniform_(emb.weight, -d_embedding**-0.5, d_embedding**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([emb(x[:, i]) for i, emb in enumerate(self.embeddings)], dim=1)


class FlatInput(nn.Module):
    """Numeric features followed by flattened categorical embeddings, for MLP-like models.

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) | None
        returns: (batch, n_num + n_cat * d_cat_embedding)
    """

    def __init__(self, n_num: int, cat_cardinalities: list[int], d_cat_embedding: int = 8) -> None:
        super().__init__()
        self.cat = CategoricalEmbeddings(cat_cardinalities, d_cat_embedding) if cat_cardinalities else None
        self.d_out = n_num + len(cat_cardinalities) * d_cat_embedding

    def forward(self, x_num: Tensor, x_cat: Tensor | None) -> Tensor:
        if self.cat is None:
            return x_num
        if x_cat is None:
            raise ValueError("this model was built with categorical features; pass x_cat")
        return torch.cat([x_num, self.cat(x_cat).flatten(1)], dim=1)
