"""Dropout whose CPU masks cost a quarter of the random draws: ``Dropout(p)`` for ``nn.Dropout(p)``, ``keep_mask``.

On CPU, drawing the random numbers is most of dropout's cost (``bernoulli_`` and ``rand`` call the generator once
per element: for a (512, 10, 85) activation, about as long as the matmul before it). ``keep_mask`` instead draws
full 64-bit integers (``random_(-2**63, None)``: every bit uniform) and reads each as four 16-bit integers (an int16
view, no shifting or masking pass); an element is kept when its integer is at least ``round(p * 2**16) - 2**15``:
the drop probability is then p to within 2**-17 (7.6e-6), and ``keep_mask`` returns the exact keep probability, so
the rescaling stays unbiased. The mask is made in floating point (int16 -> float, then ``clamp``): on CPU comparing
into a bool tensor and multiplying by it each cost about five float passes. On other devices it is ``rand >= p``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_BITS = 16  # four lanes in the 64 random bits of an int64 draw, read through an int16 view
_LANES = 4


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> tuple[Tensor, float]:
    """A mask of ones and zeros in ``dtype``, one with probability ``1 - p`` independently per element, and that
    probability exactly.

    >>> mask, keep = keep_mask((4, 5), 0.5)
    >>> mask.shape, mask.dtype, sorted(mask.unique().tolist()), keep
    (torch.Size([4, 5]), torch.float32, [0.0, 1.0], 0.5)
    """
    device = torch.device(device)
    if device.type != "cpu":
        return (torch.rand(shape, device=device) >= p).to(dtype), 1.0 - p
    n = math.prod(shape)
    threshold = round(p * (1 << _BITS))
    bits = torch.empty(-(-n // _LANES), dtype=torch.int64).random_(-(1 << 63), None)  # uniform on all 64 bits
    lanes = bits.view(torch.int16)[:n].float()  # integers uniform on [-2**15, 2**15), exact in float32
    # 1 where lane >= threshold - 2**15, else 0 (exactly: the lanes are integers)
    mask = lanes.sub_(threshold - (1 << (_BITS - 1)) - 1).clamp_(0.0, 1.0).to(dtype)
    return mask.view(shape), 1.0 - threshold / (1 << _BITS)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout with ``keep_mask``: zero each element with probability p, scale the rest by 1 / (1 - p)."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    mask, keep = keep_mask(x.shape, p, x.device, x.dtype)
    return x * mask.mul_(1.0 / keep)


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
