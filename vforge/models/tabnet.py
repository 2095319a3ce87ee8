"""TabNet of Arik & Pfister 2021 (https://arxiv.org/abs/1908.07442): sequential attention with sparse feature masks."""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vforge.layers.activations import get_simplex_map
from vforge.layers.embeddings import FlatInput
from vforge.layers.norms import GhostBatchNorm
from vforge.models.base import Model


class GLULayer(nn.Module):
    """Linear (no bias) -> GhostBatchNorm -> GLU. Shape: (batch, d_in) -> (batch, d_out)."""

    def __init__(self, d_in: int, d_out: int, *, virtual_batch_size: int, momentum: float,
                 linear: nn.Linear | None = None) -> None:
        super().__init__()
        self.linear = linear if linear is not None else nn.Linear(d_in, 2 * d_out, bias=False)
        self.bn = GhostBatchNorm(2 * d_out, virtual_batch_size, momentum)

    def forward(self, x: Tensor) -> Tensor:
        return F.glu(self.bn(self.linear(x)), dim=-1)


class FeatureTransformer(nn.Module):
    """GLU layers, the first ``len(shared)`` with weights shared across steps, then ``n_independent`` of this step's
    own; each after the first is residual with the sqrt(0.5) scaling that keeps the variance stable.

    Shape:
        x: (batch, d_in)
        returns: (batch, n_d + n_a)
    """

    def __init__(self, d_in: int, d_hidden: int, shared: nn.ModuleList, n_independent: int, *,
                 virtual_batch_size: int, momentum: float) -> None:
        super().__init__()
        opts: dict[str, Any] = dict(virtual_batch_size=virtual_batch_size, momentum=momentum)
        layers = [GLULayer(d_in if i == 0 else d_hidden, d_hidden, linear=cast(nn.Linear, linear), **opts)
                  for i, linear in enumerate(shared)]
        layers += [GLULayer(d_in if not layers and i == 0 else d_hidden, d_hidden, **opts) for i in range(n_independent)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers[0](x)
        for layer in self.layers[1:]:
            x = (x + layer(x)) * math.sqrt(0.5)
        return x


class TabNet(Model):
    """BatchNorm -> step 0 feature transformer -> n_steps x [attentive transformer -> mask -> feature transformer ->
    ReLU(decision part)] -> sum of decisions -> Linear.

    At step i the attentive transformer maps the previous step's attention part a to a simplex point
    s_i = sparsemax(GBN(Linear(a))) (or entmax15), the mask is M_i = P_i * s_i and the prior is updated to
    P_{i+1} = P_i * min(1, gamma - s_i), with P_1 = 1.

    NOTE[paper]: the paper's mask is sparsemax(P_i * h) with P_{i+1} = P_i * (gamma - M_i). Putting the prior outside
    the projection makes the relaxation bound exact: with gamma = 1, P_{i+1} = P_i - M_i, so each feature's masks sum
    over the steps to 1 - P_{n+1} <= 1 (a feature is used at most once in total); larger gamma allows reuse, and
    min(1, .) keeps the prior, hence the masks, within [0, 1].

    ``forward_train`` also returns lambda_sparse times the masks' mean entropy (the paper's sparsity regularizer),
    which the training loop adds to the loss. ``feature_importances`` gives per-row importances.

    Args:
        n_d: width of the decision part of each step.
        n_a: width of the attention part, which feeds the next mask.
        gamma: the relaxation parameter: 1 uses each feature at most once over the steps.
        mask: sparsemax or entmax15 (or softmax).
        lambda_sparse: the weight of the sparsity regularizer.
        d_cat_embedding: the width of each categorical feature's embedding in the input.

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) | None
        returns: (batch, d_out)
    """

    column_feature: Tensor  # buffer: the feature each input column belongs to

    def __init__(self, *, n_num: int, cat_cardinalities: list[int], d_out: int, n_d: int, n_a: int, n_steps: int,
                 gamma: float, n_independent: int, n_shared: int, virtual_batch_size: int, momentum: float,
                 lambda_sparse: float, mask: str = "sparsemax", d_cat_embedding: int = 2) -> None:
        super().__init__()
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps=}")
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1 (1 uses each feature once), got {gamma=}")
        if n_independent + n_shared < 1:
            raise ValueError(f"need at least one GLU layer, got {n_independent=}, {n_shared=}")
        self.n_d, self.n_steps, self.gamma, self.lambda_sparse = n_d, n_steps, gamma, lambda_sparse
        self.mask_fn = get_simplex_map(mask)
        self.input = FlatInput(n_num, cat_cardinalities, d_cat_embedding)
        d_in = self.input.d_out
        # Which input columns belong to which original feature (a categorical feature spans its embedding's columns).
        groups = list(range(n_num)) + [n_num + i for i in range(len(cat_cardinalities)) for _ in range(d_cat_embedding)]
        self.register_buffer("column_feature", torch.tensor(groups), persistent=False)
        self.n_features = n_num + len(cat_cardinalities)
        self.input_bn = nn.BatchNorm1d(d_in, momentum=0.01)
        d_hidden = n_d + n_a
        shared = nn.ModuleList(nn.Linear(d_in if i == 0 else d_hidden, 2 * d_hidden, bias=False)
                               for i in range(n_shared))
        opts: dict[str, Any] = dict(virtual_batch_size=virtual_batch_size, momentum=momentum)
        self.feature_transformers = nn.ModuleList(
            FeatureTransformer(d_in, d_hidden, shared, n_independent, **opts) for _ in range(n_steps + 1))
        self.attentive = nn.ModuleList(
            nn.Sequential(nn.Linear(n_a, d_in, bias=False), GhostBatchNorm(d_in, virtual_batch_size, momentum))
            for _ in range(n_steps))
        self.head = nn.Linear(n_d, d_out, bias=False)

    def _steps(self, x_num: Tensor, x_cat: Tensor | None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Run all steps; return the summed decision (batch, n_d), the masks and the step decisions."""
        x = self.input_bn(self.input(x_num, x_cat))  # (batch, d_in)
        a = self.feature_transformers[0](x)[:, self.n_d:]
        prior = torch.ones_like(x)
        masks, decisions = [], []
        for step in range(self.n_steps):
            s = self.mask_fn(self.attentive[step](a))  # (batch, d_in), on the simplex
            mask = prior * s
            prior = prior * (self.gamma - s).clamp_max(1.0)
            h = self.feature_transformers[step + 1](mask * x)
            d, a = F.relu(h[:, : self.n_d]), h[:, self.n_d:]
            masks.append(mask)
            decisions.append(d)
        return torch.stack(decisions).sum(0), masks, decisions

    def forward(self, x_num: Tensor, x_cat: Tensor | None = None) -> Tensor:
        return self.head(self._steps(x_num, x_cat)[0])

    def forward_train(self, x_num: Tensor, x_cat: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The output and lambda_sparse * the mean mask entropy of this forward pass."""
        out, masks, _ = self._steps(x_num, x_cat)
        m = torch.stack(masks)  # (n_steps, batch, d_in)
        entropy = -(m * torch.log(m + 1e-15)).sum(-1).mean()
        return self.head(out), self.lambda_sparse * entropy

    @torch.no_grad()
    def masks(self, x_num: Tensor, x_cat: Tensor | None = None) -> Tensor:
        """The feature masks of each step, (n_steps, batch, d_in) over the input columns."""
        return torch.stack(self._steps(x_num, x_cat)[1])

    @torch.no_grad()
    def feature_importances(self, x_num: Tensor, x_cat: Tensor | None = None) -> Tensor:
        """Per-row feature importances (batch, n_num + n_cat), each row summing to 1: the masks weighted by how much
        each step contributed to the decision, sum_i ||ReLU(d_i)||_1 * M_i (the paper's aggregate mask)."""
        _, masks, decisions = self._steps(x_num, x_cat)
        weight = torch.stack(decisions).sum(-1, keepdim=True)  # (n_steps, batch, 1)
        columns = (weight * torch.stack(masks)).sum(0)  # (batch, d_in)
        per_feature = columns.new_zeros(len(columns), self.n_features).index_add_(1, self.column_feature, columns)
        return per_feature / per_feature.sum(1, keepdim=True).clamp_min(1e-12)
