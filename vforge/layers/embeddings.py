"""Feature embeddings shared by the models: numeric (linear, periodic, piecewise-linear), categorical, CLS token.

Numeric embeddings are selectable by name: ``get_num_embeddings("periodic", n_features=11, d_embedding=24)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def _uniform_(t: Tensor, d: int) -> Tensor:
    return nn.init.uniform_(t, -(d**-0.5), d**-0.5)


class LinearEmbeddings(nn.Module):
    """Embed each numeric feature with its own linear map, x_i * w_i + b_i.

    Shape:
        x: (batch, n_features)
        returns: (batch, n_features, d_embedding)

    >>> LinearEmbeddings(n_features=3, d_embedding=4)(torch.randn(2, 3)).shape
    torch.Size([2, 3, 4])
    """

    def __init__(self, n_features: int, d_embedding: int) -> None:
        super().__init__()
        if n_features < 1 or d_embedding < 1:
            raise ValueError(f"n_features and d_embedding must be positive, got {n_features=}, {d_embedding=}")
        self.weight = nn.Parameter(_uniform_(torch.empty(n_features, d_embedding), d_embedding))
        self.bias = nn.Parameter(_uniform_(torch.empty(n_features, d_embedding), d_embedding))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.bias, x[..., None], self.weight)


class _PerFeatureLinear(nn.Module):
    """A separate Linear(d_in, d_out) for each feature. Shape: (batch, n_features, d_in) -> (..., d_out)."""

    def __init__(self, n_features: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(_uniform_(torch.empty(n_features, d_in, d_out), d_in))
        self.bias = nn.Parameter(_uniform_(torch.empty(n_features, d_out), d_in))

    def forward(self, x: Tensor) -> Tensor:
        # (n_features, batch, d_in) @ (n_features, d_in, d_out): one batched matmul, no per-feature loop.
        return torch.baddbmm(self.bias[:, None], x.transpose(0, 1), self.weight).transpose(0, 1)


class PeriodicEmbeddings(nn.Module):
    """PLR: periodic features [cos(2 pi c x), sin(2 pi c x)] with trainable frequencies c ~ N(0, sigma), then a
    per-feature Linear and ReLU (Gorishniy et al. 2022, https://arxiv.org/abs/2203.05556). ``lite=True`` shares the
    linear layer across features (the "PLR(lite)" of TabM).

    Shape:
        x: (batch, n_features)
        returns: (batch, n_features, d_embedding)

    >>> PeriodicEmbeddings(n_features=3, d_embedding=4)(torch.randn(2, 3)).shape
    torch.Size([2, 3, 4])
    """

    def __init__(self, n_features: int, d_embedding: int, n_frequencies: int = 48, sigma: float = 0.1,
                 lite: bool = False, activation: bool = True) -> None:
        super().__init__()
        if sigma <= 0 or n_frequencies < 1:
            raise ValueError(f"sigma and n_frequencies must be positive, got {sigma=}, {n_frequencies=}")
        # NOTE[paper]: trunc at 3 sigma as rtdl_num_embeddings does, so no initial frequency is extreme.
        self.frequencies = nn.Parameter(nn.init.trunc_normal_(torch.empty(n_features, n_frequencies), 0.0, sigma,
                                                              -3 * sigma, 3 * sigma))
        self.linear = nn.Linear(2 * n_frequencies, d_embedding) if lite else _PerFeatureLinear(
            n_features, 2 * n_frequencies, d_embedding)
        self.activation = nn.ReLU() if activation else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        angle = 2 * math.pi * self.frequencies * x[..., None]  # (batch, n_features, n_frequencies)
        return self.activation(self.linear(torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)))


class PiecewiseLinearEncoding(nn.Module):
    """PLE: x encoded against bin edges b_0 < ... < b_T as e_t = clamp((x - b_{t-1}) / (b_t - b_{t-1}), 0, 1), the
    first bin open below and the last open above (Gorishniy et al. 2022, https://arxiv.org/abs/2203.05556).

    NOTE[paper]: the paper takes the edges from training-set quantiles. A model here is built before it sees data,
    so the default edges are standard-normal quantiles (vforge standardizes features on the training split);
    ``fit_bins(x_train)`` replaces them with the data's own quantiles. The edges are a buffer, saved with the model.

    Shape:
        x: (batch, n_features)
        returns: (batch, n_features, n_bins)
    """

    edges: Tensor  # buffer (n_features, n_bins + 1)

    def __init__(self, n_features: int, n_bins: int = 16) -> None:
        super().__init__()
        if n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {n_bins=}")
        probs = torch.linspace(0.01, 0.99, n_bins + 1, dtype=torch.float64)
        edges = torch.special.ndtri(probs).float().expand(n_features, -1).clone()
        self.register_buffer("edges", edges)  # (n_features, n_bins + 1)

    @torch.no_grad()
    def fit_bins(self, x: Tensor) -> None:
        """Set the edges to the per-feature quantiles of ``x`` (batch, n_features)."""
        probs = torch.linspace(0, 1, self.edges.shape[1], dtype=x.dtype, device=x.device)
        self.edges.copy_(torch.quantile(x, probs, dim=0).T)

    def forward(self, x: Tensor) -> Tensor:
        left, width = self.edges[:, :-1], (self.edges[:, 1:] - self.edges[:, :-1]).clamp_min(1e-6)
        e = (x[..., None] - left) / width  # (batch, n_features, n_bins)
        # Interior bins are clamped to [0, 1]; the first may go below 0 and the last above 1.
        return torch.cat([e[..., :1].clamp_max(1), e[..., 1:-1].clamp(0, 1), e[..., -1:].clamp_min(0)], dim=-1)


class PiecewiseLinearEmbeddings(nn.Module):
    """PLE followed by a per-feature Linear and ReLU ("Q-LR" in Gorishniy et al. 2022).

    Shape:
        x: (batch, n_features)
        returns: (batch, n_features, d_embedding)
    """

    def __init__(self, n_features: int, d_embedding: int, n_bins: int = 16, activation: bool = True) -> None:
        super().__init__()
        self.encoding = PiecewiseLinearEncoding(n_features, n_bins)
        self.linear = _PerFeatureLinear(n_features, n_bins, d_embedding)
        self.activation = nn.ReLU() if activation else nn.Identity()

    def fit_bins(self, x: Tensor) -> None:
        self.encoding.fit_bins(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.linear(self.encoding(x)))


NUM_EMBEDDINGS: dict[str, Callable[..., nn.Module]] = {
    "linear": LinearEmbeddings,
    "periodic": PeriodicEmbeddings,
    "piecewise_linear": PiecewiseLinearEmbeddings,
}


def get_num_embeddings(name: str, *, n_features: int, d_embedding: int, **options: Any) -> nn.Module:
    """Numeric embeddings by name; ``options`` go to the class (e.g. ``sigma`` for periodic). Unknown names list the
    valid ones."""
    try:
        cls = NUM_EMBEDDINGS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown numeric embeddings {name!r}; valid names: {', '.join(NUM_EMBEDDINGS)}") from None
    return cls(n_features, d_embedding, **options)


class CategoricalEmbeddings(nn.Module):
    """One embedding table per categorical feature.

    Shape:
        x: (batch, n_cat) int64
        returns: (batch, n_cat, d_embedding)

    >>> CategoricalEmbeddings([3, 5], d_embedding=4)(torch.tensor([[0, 4]])).shape
    torch.Size([1, 2, 4])
    """

    offsets: Tensor  # buffer

    def __init__(self, cardinalities: list[int], d_embedding: int) -> None:
        super().__init__()
        if not cardinalities:
            raise ValueError("cardinalities must be non-empty")
        # One table with per-feature offsets: a single lookup instead of one per feature.
        self.register_buffer("offsets", torch.tensor([0, *cardinalities[:-1]]).cumsum(0), persistent=False)
        self.embeddings = nn.Embedding(sum(cardinalities), d_embedding)
        _uniform_(self.embeddings.weight, d_embedding)

    def forward(self, x: Tensor) -> Tensor:
        return self.embeddings(x + self.offsets)


class CLSToken(nn.Module):
    """A learned token prepended to the sequence; its final state is read out (Devlin et al. 2019).

    Shape:
        x: (batch, n_tokens, d_embedding)
        returns: (batch, 1 + n_tokens, d_embedding)
    """

    def __init__(self, d_embedding: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(_uniform_(torch.empty(d_embedding), d_embedding))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.weight.expand(x.shape[0], 1, -1), x], dim=1)  # shape[0], not len(): traceable by export


class FeatureTokenizer(nn.Module):
    """Turn a row into tokens: one per numeric feature, one per categorical feature, and optionally a leading CLS
    token (the Feature Tokenizer of FT-Transformer, Gorishniy et al. 2021).

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) | None
        returns: (batch, n_tokens, d_embedding), n_tokens = cls + n_num + n_cat
    """

    def __init__(self, n_num: int, cat_cardinalities: list[int], d_embedding: int, *, num_embeddings: str = "linear",
                 num_embeddings_options: dict | None = None, cls: bool = True) -> None:
        super().__init__()
        if n_num < 1 and not cat_cardinalities:
            raise ValueError(f"need at least one feature, got {n_num=}, {cat_cardinalities=}")
        self.num = (get_num_embeddings(num_embeddings, n_features=n_num, d_embedding=d_embedding,
                                       **dict(num_embeddings_options or {})) if n_num else None)
        self.cat = CategoricalEmbeddings(cat_cardinalities, d_embedding) if cat_cardinalities else None
        self.cls = CLSToken(d_embedding) if cls else None
        self.n_tokens = int(cls) + n_num + len(cat_cardinalities)

    def forward(self, x_num: Tensor, x_cat: Tensor | None) -> Tensor:
        parts = [] if self.num is None else [self.num(x_num)]
        if self.cat is not None:
            if x_cat is None:
                raise ValueError("this model was built with categorical features; pass x_cat")
            parts.append(self.cat(x_cat))
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return x if self.cls is None else self.cls(x)


class FlatInput(nn.Module):
    """Numeric features (raw, or embedded and flattened) followed by flattened categorical embeddings, for MLP-like
    models.

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) | None
        returns: (batch, d_out), d_out = n_num * (d_num_embedding or 1) + n_cat * d_cat_embedding
    """

    def __init__(self, n_num: int, cat_cardinalities: list[int], d_cat_embedding: int = 8, *,
                 num_embeddings: str | None = None, d_num_embedding: int | None = None,
                 num_embeddings_options: dict | None = None) -> None:
        super().__init__()
        if num_embeddings is not None and not d_num_embedding:
            raise ValueError(f"num_embeddings={num_embeddings!r} needs d_num_embedding, got {d_num_embedding=}")
        self.num = (get_num_embeddings(num_embeddings, n_features=n_num, d_embedding=d_num_embedding,
                                       **dict(num_embeddings_options or {}))
                    if num_embeddings and n_num and d_num_embedding else None)
        self.cat = CategoricalEmbeddings(cat_cardinalities, d_cat_embedding) if cat_cardinalities else None
        self.d_out = n_num * (d_num_embedding if self.num is not None and d_num_embedding else 1) + len(cat_cardinalities) * d_cat_embedding

    def forward(self, x_num: Tensor, x_cat: Tensor | None) -> Tensor:
        x = x_num if self.num is None else self.num(x_num).flatten(1)
        if self.cat is None:
            return x
        if x_cat is None:
            raise ValueError("this model was built with categorical features; pass x_cat")
        return torch.cat([x, self.cat(x_cat).flatten(1)], dim=1)
