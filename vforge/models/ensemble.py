"""AutoML's ensemble as one servable model: a convex combination of trained vforge models, LightGBM trees and the
baseline, all on the same scaled inputs and predicting the same scaled target (the runs of one AutoML sweep share
their data pipeline), so ``model.pt``, ``python -m vforge.predict``, the MLflow pyfunc and ONNX export treat it as
any model.

``Trees`` evaluates a LightGBM booster's numerical trees in torch (every tree at once, one gather per level), so the
ensemble needs no LightGBM at serving time. (hummingbird-ml does this conversion, but pins an onnx release older than
the one torch's exporter uses here.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vforge.models.base import Model


def tree_arrays(booster: Any, num_iteration: int | None = None) -> dict[str, np.ndarray]:
    """A LightGBM booster's trees as flat node arrays (all trees, node 0 of tree t at ``roots[t]``): ``feature``,
    ``threshold`` (go left where ``x[feature] <= threshold``), ``left``, ``right`` (global node indices; a leaf points
    at itself) and ``value`` (a leaf's output, 0 elsewhere). Only numerical ``<=`` splits: a categorical split or a
    missing-value rule other than none is refused (vforge's features are finite numbers)."""
    model = booster.dump_model(num_iteration=num_iteration)
    feature: list[int] = []
    threshold: list[float] = []
    left: list[int] = []
    right: list[int] = []
    value: list[float] = []
    roots: list[int] = []

    def add(node: dict[str, Any]) -> int:
        i = len(feature)
        feature.append(0)
        threshold.append(0.0)
        left.append(i)
        right.append(i)
        value.append(0.0)
        if "leaf_value" in node:
            value[i] = float(node["leaf_value"])
            return i
        if node.get("decision_type") != "<=" or node.get("missing_type", "None") not in ("None", "NaN"):
            raise ValueError(f"LightGBM split {node.get('decision_type')!r} with missing type "
                             f"{node.get('missing_type')!r}: only numerical '<=' splits can be served as an ensemble")
        feature[i], threshold[i] = int(node["split_feature"]), float(node["threshold"])
        left[i] = add(node["left_child"])
        right[i] = add(node["right_child"])
        return i

    for tree in model["tree_info"]:
        roots.append(add(tree["tree_structure"]))
    return {"feature": np.array(feature, np.int64), "threshold": np.array(threshold, np.float64),
            "left": np.array(left, np.int64), "right": np.array(right, np.int64),
            "value": np.array(value, np.float64), "roots": np.array(roots, np.int64)}


def tree_depth(arrays: dict[str, np.ndarray]) -> int:
    """The number of splits on the longest path from a root to a leaf."""
    depth = np.zeros(len(arrays["feature"]), np.int64)
    for i in range(len(depth) - 1, -1, -1):  # children come after their parent
        if arrays["left"][i] != i:
            depth[i] = 1 + max(depth[arrays["left"][i]], depth[arrays["right"][i]])
    return int(depth[arrays["roots"]].max()) if len(arrays["roots"]) else 0


class Trees(nn.Module):
    """The sum of a booster's trees (``tree_arrays``) at ``x``: every row walks every tree, ``depth`` steps.

    Shape:
        x: (batch, n_features); returns (batch,) float64
    """

    feature: Tensor
    left: Tensor
    right: Tensor
    threshold: Tensor
    value: Tensor
    roots: Tensor

    def __init__(self, n_nodes: int, n_trees: int, depth: int) -> None:
        super().__init__()
        self.depth = depth
        for name, dtype in (("feature", torch.int64), ("left", torch.int64), ("right", torch.int64),
                            ("threshold", torch.float64), ("value", torch.float64)):
            self.register_buffer(name, torch.zeros(n_nodes, dtype=dtype))
        self.register_buffer("roots", torch.zeros(n_trees, dtype=torch.int64))

    @classmethod
    def of(cls, arrays: dict[str, np.ndarray]) -> Trees:
        trees = cls(len(arrays["feature"]), len(arrays["roots"]), tree_depth(arrays))
        for name, values in arrays.items():
            getattr(trees, name).copy_(torch.from_numpy(values))
        return trees

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(torch.float64)
        node = self.roots.unsqueeze(0).expand(x.shape[0], -1)
        for _ in range(self.depth):
            go_left = torch.gather(x, 1, self.feature[node]) <= self.threshold[node]
            node = torch.where(go_left, self.left[node], self.right[node])
        return self.value[node].sum(dim=1)


class Ensemble(Model):
    """``sum_i weights[i] * member_i(x) + weight_trees * trees(x) + weight_zero * zero``: outputs in the scaled target
    (``Dataset.y``) of the members' shared pipeline; ``zero`` is the output that means no change over the baseline
    (``-y_center / y_scale``), so a weight on the baseline shrinks the others toward it. Members are built from their
    configs (``members``); ``trees`` gives the size of a LightGBM booster's arrays (``Trees``), or None.

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) | None
        returns: (batch, 1)
    """

    def __init__(self, *, n_num: int, cat_cardinalities: list[int], d_out: int, members: list[dict[str, Any]],
                 weights: list[float], trees: dict[str, int] | None = None, weight_trees: float = 0.0,
                 weight_zero: float = 0.0, zero: float = 0.0) -> None:
        super().__init__()
        from hydra.utils import instantiate

        if d_out != 1 or len(weights) != len(members):
            raise ValueError(f"an ensemble has one output and a weight per member; got d_out={d_out}, "
                             f"{len(weights)} weights for {len(members)} members")
        self.members = nn.ModuleList(instantiate(m, n_num=n_num, cat_cardinalities=cat_cardinalities, d_out=1)
                                     for m in members)
        self.weights = [float(w) for w in weights]
        self.trees = None if trees is None else Trees(**trees)
        self.weight_trees, self.weight_zero, self.zero = float(weight_trees), float(weight_zero), float(zero)

    def forward(self, x_num: Tensor, x_cat: Tensor | None = None) -> Tensor:
        out = torch.full((x_num.shape[0], 1), self.weight_zero * self.zero, dtype=x_num.dtype, device=x_num.device)
        for w, member in zip(self.weights, self.members):
            out = out + w * member(x_num, x_cat)[:, :1]
        if self.trees is not None:
            out = out + self.weight_trees * self.trees(x_num).to(x_num.dtype).unsqueeze(1)
        return out


def assemble(nets: list[tuple[dict[str, Any], nn.Module, float]], booster: Any, weight_trees: float,
             weight_zero: float, zero: float, *, n_num: int, cat_cardinalities: list[int]) -> tuple[Ensemble, dict]:
    """The ``Ensemble`` of trained members (``(config, module, weight)`` each, the module's weights copied), a LightGBM
    ``booster`` (its ``best_iteration`` trees; None: no trees) and the baseline's weight, with the config that
    rebuilds it (what ``model.pt`` saves), in eval mode."""
    arrays = None if booster is None else tree_arrays(booster, booster.best_iteration or None)
    config: dict[str, Any] = {
        "_target_": f"{__name__}.Ensemble", "_recursive_": False, "members": [c for c, _, _ in nets],
        "weights": [float(w) for _, _, w in nets],
        "trees": None if arrays is None else {"n_nodes": len(arrays["feature"]), "n_trees": len(arrays["roots"]),
                                              "depth": tree_depth(arrays)},
        "weight_trees": float(weight_trees), "weight_zero": float(weight_zero), "zero": float(zero)}
    ensemble = Ensemble(n_num=n_num, cat_cardinalities=cat_cardinalities, d_out=1,
                        **{k: v for k, v in config.items() if not k.startswith("_")})
    for target, (_, module, _) in zip(ensemble.members, nets):
        target.load_state_dict(module.state_dict())
    if arrays is not None:
        ensemble.trees = Trees.of(arrays)
    return ensemble.eval(), config
