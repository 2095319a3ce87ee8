"""The mean of networks of one config trained apart: a deep ensemble over seeds (Lakshminarayanan et al. 2017,
https://arxiv.org/abs/1612.01474). ``trainer.n_seeds=k`` trains ``k`` copies of the configured model on seeds
``seed .. seed + k - 1`` (their own initialisation and batch order, each early-stopped on its own) and saves this
module over them, so serving, export and the do-no-harm step see one model."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vforge.models.base import Model


class SeedAverage(Model):
    """``k`` members of the config ``member``, their outputs averaged (each trained apart by ``train()``).

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) | None
        returns: (batch, d_out), the members' mean
    """

    def __init__(self, *, n_num: int, cat_cardinalities: list[int], d_out: int, member: dict[str, Any],
                 k: int) -> None:
        super().__init__()
        from hydra.utils import instantiate

        if k < 1:
            raise ValueError(f"trainer.n_seeds must be >= 1, got {k}")
        self.members = nn.ModuleList(instantiate(member, n_num=n_num, cat_cardinalities=cat_cardinalities,
                                                 d_out=d_out) for _ in range(k))

    @classmethod
    def of(cls, members: list[nn.Module]) -> SeedAverage:
        """The average over already trained ``members`` (no new weights are made)."""
        average = cls.__new__(cls)
        Model.__init__(average)
        average.members = nn.ModuleList(members)
        return average

    def forward(self, x_num: Tensor, x_cat: Tensor | None = None) -> Tensor:
        return torch.stack([m(x_num, x_cat) for m in self.members]).mean(0)


def config(member: dict[str, Any], k: int) -> dict[str, Any]:
    """The model config that rebuilds ``SeedAverage`` over ``k`` members of ``member`` (what ``model.pt`` saves)."""
    return {"_target_": f"{__name__}.SeedAverage", "_recursive_": False, "member": member, "k": k}
