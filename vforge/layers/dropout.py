"""Dropout whose CPU masks cost a third of the random draws: ``Dropout(p)`` for ``nn.Dropout(p)``, ``keep_mask``.

On CPU, drawing the random numbers is most of dropout's cost (``bernoulli_`` and ``rand`` call the generator once
per element: for a (512, 10, 85) activation, about as long as the matmul before it). ``keep_mask`` instead cuts each
63-bit draw of ``Tensor.random_`` into three 21-bit uniform integers and compares them with ``p * 2**21`` rounded:
the drop probability is then p to within 2.4e-7 (``keep_mask`` returns the exact keep probability, so the
rescaling stays unbiased). On other devices it is ``rand >= p``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_BITS = 21  # three lanes in the 63 random bits of an int64 draw
_LANE = (1 << _BITS) - 1


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device | str = "cpu") -> tuple[Tensor, float]:
    """A bool mask, True with probability ``1 - p`` independently per element, and that probability exactly.

    >>> mask, keep = keep_mask((4, 5), 0.5)
    >>> mask.shape, mask.dtype, keep
    (torch.Size([4, 5]), torch.bool, 0.5)
    """
    device = torch.device(device)
    if device.type != "cpu":
        return torch.rand(shape, device=device) >= p, 1.0 - p
    n = math.prod(shape)
    threshold = round(p * (1 << _BITS))
    m = (n + 2) // 3
    bits = torch.empty(m, dtype=torch.int64).random_()  # uniform on [0, 2**63)
    mask = torch.empty(3, m, dtype=torch.bool)  # the lanes written in place: no concatenation pass
    torch.ge(bits & _LANE, threshold, out=mask[0])
    torch.ge((bits >> _BITS) & _LANE, threshold, out=mask[1])
    torch.ge(bits >> 2 * _BITS, threshold, out=mask[2])
    return mask.view(-1)[:n].view(shape), 1.0 - threshold / (1 << _BITS)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout with ``keep_mask``: zero each element with probability p, scale the rest by 1 / (1 - p)."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    mask, keep = keep_mask(x.shape, p, x.device)
    return x * (mask * (1.0 / keep)).to(x.dtype)


class Dropout(nn.Module):
    """``nn.Dropout`` with ``keep_mask``'s cheaper CPU masks. Identity in eval mode.

    Shape:
        x: (...)
        returns: (...)
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p=}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
