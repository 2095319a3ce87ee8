"""Normalization layers; the plain ones are selectable by name: ``get_norm("rmsnorm", d=64)``.

The conditional ones (AdaptiveLayerNorm, ConditionalLayerNorm) take a second input and LayerScale / QKNorm sit at
fixed places inside blocks, so those are built directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the last dimension of any (..., d) input (tokens are folded into the batch).

    Shape:
        x: (..., d)
        returns: (..., d)
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2:
            return super().forward(x)
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class GhostBatchNorm(nn.Module):
    """Batch normalization computed on virtual batches of ``virtual_batch_size`` rows (Hoffer et al. 2017,
    https://arxiv.org/abs/1705.08741), as TabNet uses it. Eval mode uses the running statistics, like BatchNorm.

    Shape:
        x: (batch, d)
        returns: (batch, d)
    """

    def __init__(self, d: int, virtual_batch_size: int = 128, momentum: float = 0.02) -> None:
        super().__init__()
        if virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be >= 1, got {virtual_batch_size=}")
        self.virtual_batch_size = virtual_batch_size
        self.bn = nn.BatchNorm1d(d, momentum=momentum)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or len(x) <= self.virtual_batch_size:
            return self.bn(x)
        n_chunks = -(-len(x) // self.virtual_batch_size)
        return torch.cat([self.bn(chunk) for chunk in x.chunk(n_chunks, dim=0)], dim=0)


class LayerScale(nn.Module):
    """Multiply a residual branch by a learnable per-channel scale initialised small (Touvron et al. 2021, CaiT,
    https://arxiv.org/abs/2103.17239).

    Shape:
        x: (..., d)
        returns: (..., d)
    """

    def __init__(self, d: int, init: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((d,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class AdaptiveLayerNorm(nn.Module):
    """adaLN: LayerNorm without affine whose shift and scale are regressed from a conditioning vector, zero-initialised
    so it starts as a plain LayerNorm (Peebles & Xie 2023, DiT, https://arxiv.org/abs/2212.09748).

    Shape:
        x: (batch, ..., d); cond: (batch, d_cond)
        returns: (batch, ..., d)
    """

    def __init__(self, d: int, d_cond: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.to_shift_scale = nn.Linear(d_cond, 2 * d)
        nn.init.zeros_(self.to_shift_scale.weight)
        nn.init.zeros_(self.to_shift_scale.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift, scale = self.to_shift_scale(cond).chunk(2, dim=-1)  # (batch, d) each
        view = (len(x),) + (1,) * (x.ndim - 2) + (x.shape[-1],)
        return self.norm(x) * (1 + scale.view(view)) + shift.view(view)


class ConditionalLayerNorm(nn.Module):
    """LayerNorm whose gain and bias are looked up per category of a conditioning variable (e.g. one per underlying
    or per option type); every category starts from gain 1, bias 0.

    Shape:
        x: (batch, ..., d); cond: (batch,) int64 in [0, n_conditions)
        returns: (batch, ..., d)
    """

    def __init__(self, d: int, n_conditions: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.gain = nn.Embedding(n_conditions, d)
        self.bias = nn.Embedding(n_conditions, d)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        view = (len(x),) + (1,) * (x.ndim - 2) + (x.shape[-1],)
        return self.norm(x) * self.gain(cond).view(view) + self.bias(cond).view(view)


class QKNorm(nn.Module):
    """RMS-normalise queries and keys per head before the dot product (Henry et al. 2020,
    https://arxiv.org/abs/2010.04245; Dehghani et al. 2023), which keeps attention logits bounded.

    Shape:
        q: (batch, n_heads, n_q, d_head); k: (batch, n_kv_heads, n_kv, d_head)
        returns: (q, k) of the same shapes
    """

    def __init__(self, d_head: int) -> None:
        super().__init__()
        self.q_norm = nn.RMSNorm(d_head)
        self.k_norm = nn.RMSNorm(d_head)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.q_norm(q), self.k_norm(k)


NORMS: dict[str, Callable[[int], nn.Module]] = {
    "layernorm": nn.LayerNorm,
    "rmsnorm": nn.RMSNorm,
    "batchnorm": BatchNorm,
    "ghost_batchnorm": GhostBatchNorm,
    "identity": lambda d: nn.Identity(),
}


def get_norm(name: str, d: int) -> nn.Module:
    """A fresh normalization over the last dimension of width ``d``; unknown names list the valid ones."""
    try:
        factory = NORMS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown norm {name!r}; valid names: {', '.join(NORMS)}") from None
    return factory(d)
