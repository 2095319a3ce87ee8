"""Activations selectable by name: ``get_activation("swiglu", d=64)``.

Gated (GLU) activations split their input in two along the last dimension and return half of it, so the layer before
them must be twice as wide: ``d_in * glu_factor(name)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LiSHT(nn.Module):
    """Linearly scaled hyperbolic tangent, x * tanh(x) (Roy et al. 2019, https://arxiv.org/abs/1901.05894)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.tanh(x)


class SquaredReLU(nn.Module):
    """relu(x)^2 (So et al. 2021, Primer, https://arxiv.org/abs/2109.08668)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x).square()


class StarReLU(nn.Module):
    """STAR: s * relu(x)^2 + b with learnable scalars s, b (Yu et al. 2022, https://arxiv.org/abs/2210.13452).

    The defaults 0.8944 and -0.4472 make the output zero-mean, unit-variance for standard normal input.
    """

    def __init__(self, scale: float = 0.8944, bias: float = -0.4472) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))
        self.bias = nn.Parameter(torch.tensor(bias))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.relu(x).square() + self.bias


class AconC(nn.Module):
    """ACON-C: (p1 - p2) x sigmoid(beta (p1 - p2) x) + p2 x (Ma et al. 2021, https://arxiv.org/abs/2009.04759).

    Learns p1, p2, beta per channel when ``d`` is given, else one scalar each.

    Shape:
        x: (..., d)
        returns: (..., d)
    """

    def __init__(self, d: int | None = None) -> None:
        super().__init__()
        shape = (d,) if d else (1,)
        self.p1 = nn.Parameter(torch.ones(shape))
        self.p2 = nn.Parameter(torch.zeros(shape))
        self.beta = nn.Parameter(torch.ones(shape))

    def forward(self, x: Tensor) -> Tensor:
        dp = (self.p1 - self.p2) * x
        return dp * torch.sigmoid(self.beta * dp) + self.p2 * x


class MetaAcon(AconC):
    """Meta-ACON: ACON-C whose switching factor beta is generated from the input by a small bottleneck network.

    NOTE[paper]: the paper pools over space to get beta per channel; a tabular row has no spatial axis, so beta is
    computed per row (and per token) from its own features.

    Shape:
        x: (..., d)
        returns: (..., d)
    """

    def __init__(self, d: int | None = None, reduction: int = 4) -> None:
        if not d:
            raise ValueError("meta_acon needs the feature width: get_activation('meta_acon', d=...)")
        super().__init__(d)
        del self.beta
        d_hidden = max(d // reduction, 4)
        self.beta_net = nn.Sequential(nn.Linear(d, d_hidden), nn.Linear(d_hidden, d), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        dp = (self.p1 - self.p2) * x
        return dp * torch.sigmoid(self.beta_net(x) * dp) + self.p2 * x


class GLU(nn.Module):
    """Gated linear unit family: a * act(b) for x = [a, b] split on the last dimension (Shazeer 2020,
    https://arxiv.org/abs/2002.05202). ReGLU uses relu, GeGLU gelu, SwiGLU silu.

    Shape:
        x: (..., 2 * d)
        returns: (..., d)
    """

    def __init__(self, gate: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] % 2:
            raise ValueError(f"a GLU activation needs an even last dimension, got {x.shape[-1]}")
        a, b = x.chunk(2, dim=-1)
        return a * self.gate(b)


class ReGLU(GLU):
    def __init__(self) -> None:
        super().__init__(F.relu)


class GeGLU(GLU):
    def __init__(self) -> None:
        super().__init__(F.gelu)


class SwiGLU(GLU):
    def __init__(self) -> None:
        super().__init__(F.silu)


# name -> factory(d); d is the width the activation sees (only the learnable ones use it).
ACTIVATIONS: dict[str, Callable[[int | None], nn.Module]] = {
    "relu": lambda d: nn.ReLU(),
    "gelu": lambda d: nn.GELU(),
    "silu": lambda d: nn.SiLU(),
    "mish": lambda d: nn.Mish(),
    "elu": lambda d: nn.ELU(),
    "selu": lambda d: nn.SELU(),
    "softplus": lambda d: nn.Softplus(),
    "tanh": lambda d: nn.Tanh(),
    "lisht": lambda d: LiSHT(),
    "squared_relu": lambda d: SquaredReLU(),
    "star": lambda d: StarReLU(),
    "acon_c": AconC,
    "meta_acon": MetaAcon,
    "reglu": lambda d: ReGLU(),
    "geglu": lambda d: GeGLU(),
    "swiglu": lambda d: SwiGLU(),
}
GLU_ACTIVATIONS = frozenset({"reglu", "geglu", "swiglu"})


def _check(name: str) -> str:
    key = name.lower()
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid names: {', '.join(ACTIVATIONS)}")
    return key


def get_activation(name: str, d: int | None = None) -> nn.Module:
    """A fresh activation module by name; unknown names list the valid ones.

    Args:
        d: the width of the activation's input (after halving for GLUs); acon_c uses it for per-channel
            parameters, meta_acon requires it.
    """
    return ACTIVATIONS[_check(name)](d)


def glu_factor(name: str) -> int:
    """2 for gated activations (the layer before must produce twice the width), else 1."""
    return 2 if _check(name) in GLU_ACTIVATIONS else 1


def sparsemax(z: Tensor) -> Tensor:
    """Euclidean projection of z onto the probability simplex along the last dimension (Martins & Astudillo 2016,
    https://arxiv.org/abs/1602.02068): max(z - tau, 0) with tau chosen so the output sums to 1. Exact, sort based;
    autograd through the sorted values gives the sparsemax Jacobian.

    Shape:
        z: (..., n)
        returns: (..., n), non-negative, summing to 1, usually with exact zeros

    >>> sparsemax(torch.tensor([0.5, 0.0]))
    tensor([0.7500, 0.2500])
    """
    z = z - z.max(dim=-1, keepdim=True).values
    z_sorted = z.sort(dim=-1, descending=True).values
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype, device=z.device)
    cumsum = z_sorted.cumsum(dim=-1)
    support = (1 + k * z_sorted > cumsum).sum(dim=-1, keepdim=True)  # (..., 1), >= 1
    tau = (cumsum.gather(-1, support - 1) - 1) / support.to(z.dtype)
    return (z - tau).clamp_min(0)


def entmax15(z: Tensor) -> Tensor:
    """1.5-entmax along the last dimension (Peters et al. 2019, https://arxiv.org/abs/1905.05702):
    max(z / 2 - tau, 0)^2 with tau chosen so the output sums to 1; sparse like sparsemax, smoother near ties.
    Exact, sort based.

    Shape:
        z: (..., n)
        returns: (..., n), non-negative, summing to 1
    """
    z = (z - z.max(dim=-1, keepdim=True).values) / 2
    z_sorted = z.sort(dim=-1, descending=True).values
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype, device=z.device)
    mean = z_sorted.cumsum(dim=-1) / k
    mean_sq = z_sorted.square().cumsum(dim=-1) / k
    delta = (1 - k * (mean_sq - mean.square())) / k
    with torch.no_grad():  # the support size is discrete; only the chosen tau needs a gradient
        tau_all = mean - delta.clamp_min(0).sqrt()
        support = (tau_all <= z_sorted).sum(dim=-1, keepdim=True)
    tau = mean.gather(-1, support - 1) - delta.gather(-1, support - 1).clamp_min(0).sqrt()
    return (z - tau).clamp_min(0).square()


SIMPLEX_MAPS: dict[str, Callable[[Tensor], Tensor]] = {
    "softmax": lambda z: torch.softmax(z, dim=-1),
    "sparsemax": sparsemax,
    "entmax15": entmax15,
}


def get_simplex_map(name: str) -> Callable[[Tensor], Tensor]:
    """A map from logits to the probability simplex (over the last dimension) by name."""
    try:
        return SIMPLEX_MAPS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown simplex map {name!r}; valid names: {', '.join(SIMPLEX_MAPS)}") from None
