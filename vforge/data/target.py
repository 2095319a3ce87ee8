"""The one map from the model's target units back to IV levels (decimal).

A model learns ``(iv - base) / y_scale`` centred on ``y_center`` (``data.target=change``) or ``(iv - y_center) /
y_scale`` (``level``). ``to_level`` undoes it on numpy arrays and torch tensors alike: ``Dataset.to_level`` (metrics),
``losses.RowContext.level`` (level losses) and ``vforge.serving.Serving`` (every exported artifact) call it.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

T = TypeVar("T")
VOL_POINTS = 100.0  # vol points per unit of IV (decimal): every error, width and offset is reported in vol points


def to_level(scaled: T, *, y_center: float, y_scale: float, base: Any = None) -> T:
    """Scaled target units (n,) -> IV levels (n,): ``scaled * y_scale + y_center``, plus ``base`` for a change
    target (``base=None``: a level target)."""
    level = scaled * y_scale + y_center  # type: ignore[operator]
    return cast(T, level if base is None else level + base)
