"""Parameter groups for the optimizer: weight decay on weights, none on norms, biases and embeddings."""

from __future__ import annotations

from typing import Any

from torch import nn

NO_DECAY_MODULES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.Embedding)


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: ``decay`` (weight matrices) and ``no_decay`` (``weight_decay=0``: biases, 1-d parameters such
    as LayerScale gains and CLS tokens, and every parameter of a norm or embedding layer).

    The optimizer's own ``weight_decay`` applies to the first group:
    ``instantiate(cfg.optimizer)(param_groups(model))``.
    """
    no_decay_ids = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, NO_DECAY_MODULES) or p.ndim <= 1 or name.endswith("bias"):
                no_decay_ids.add(id(p))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if id(p) not in no_decay_ids]
    no_decay = [p for p in params if id(p) in no_decay_ids]
    groups: list[dict[str, Any]] = [{"params": decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups
