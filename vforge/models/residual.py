"""A network on top of the ridge: ``ridge(x) + network(x)``, the network learning a correction to it.

The ridge (``vforge.models.linear.Ridge``, closed form, its penalty chosen on walk-forward folds inside the training
dates) is solved before training (``prepare``) and frozen; the network's last linear layer starts at zero, so the
model starts as the ridge exactly and early stopping on the validation block decides how far the correction goes.
Where the data are thin, the correction stays small and the model is the ridge; where they are not, the network
adds what the ridge's pairwise products cannot hold (issue 10: "a network whose input layer is this linear model
plus a small, heavily regularized correction").
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from vforge.models.base import Model
from vforge.models.linear import Ridge


class OnRidge(Model):
    """``linear(x) + model(x)`` with ``linear`` a ridge solved on the training split and frozen (``prepare``) and
    ``model`` any vforge network, its last linear layer initialised to zero. Built from the two configs (like
    ``Blend``), so a saved run rebuilds it like any model.

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) or None
        returns: (batch, d_out)
    """

    def __init__(self, *, n_num: int, cat_cardinalities: list[int], d_out: int, model: dict,
                 linear: dict | None = None) -> None:
        super().__init__()
        from hydra.utils import instantiate

        kw = dict(n_num=n_num, cat_cardinalities=cat_cardinalities, d_out=d_out)
        self.linear = instantiate(linear or {"_target_": "vforge.models.linear.Ridge"}, **kw)
        if not isinstance(self.linear, Ridge):
            raise ValueError(f"model.linear must be a vforge.models.linear.Ridge config, got {type(self.linear).__name__}")
        self.model = instantiate(model, **kw)
        last = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        if not last:
            raise ValueError(f"{type(self.model).__name__} has no linear layer to start at zero")
        nn.init.zeros_(last[-1].weight)
        if last[-1].bias is not None:
            nn.init.zeros_(last[-1].bias)
        self.linear.requires_grad_(False)

    def prepare(self, data: Any) -> dict[str, Any]:
        """Solve the ridge on the training split (its penalty chosen on its walk-forward folds) before the network
        trains on what it leaves; returns its selection."""
        train = data.train
        self.linear.prepare(data)
        chosen = self.linear.fit_closed_form(train.x_num, train.x_cat, train.y, train.aux["quote_date_idx"].numpy())
        return {**chosen, "why": f"the ridge (penalty {chosen['alpha']:g}: {chosen['why']}), frozen"}

    def forward(self, x_num: Tensor, x_cat: Tensor | None) -> Tensor:
        return self.linear(x_num, x_cat) + self.model(x_num, x_cat)

    def forward_train(self, x_num: Tensor, x_cat: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        out, aux = self.model.forward_train(x_num, x_cat) if isinstance(self.model, Model) else (
            self.model(x_num, x_cat), None)
        return self.linear(x_num, x_cat) + out, aux

    def set_grad_checkpointing(self, enable: bool = True) -> int:
        """The network's own (its blocks recompute in backward; the ridge has none)."""
        if not isinstance(self.model, Model):
            return super().set_grad_checkpointing(enable)
        self.grad_checkpointing = enable
        return self.model.set_grad_checkpointing(enable)
