"""Search spaces written in Hydra's sweep syntax -> Optuna distributions, and trial values -> overrides.

The grammar is the one of the official hydra-optuna-sweeper, so its configs keep working:

=================================  ==============================================
``choice(a, b, c)`` or ``a,b,c``   ``CategoricalDistribution``
``range(lo, hi[, step=s])``        ``IntDistribution`` (``FloatDistribution`` with a float bound or step);
                                   ``hi`` is included, as in the official plugin
``interval(lo, hi)``               ``FloatDistribution`` (Hydra parses interval bounds as floats)
``tag(log, interval(lo, hi))``     the same on a log scale
``tag(log, range(lo, hi))``        ``IntDistribution`` on a log scale (widths: 16 .. 1024)
anything else                      a fixed value, passed to every trial as written
=================================  ==============================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)


def _plain(value: Any) -> Any:
    """Parsed override elements (QuotedString, ...) -> plain Python values."""
    from hydra.core.override_parser.types import QuotedString

    if isinstance(value, QuotedString):
        return value.text
    return value


def distribution_from_override(override: Any) -> BaseDistribution | str:
    """One parsed Hydra override -> an Optuna distribution, or the text of its value if it is not a sweep."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    key = override.get_key_element()
    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if "log" in value.tags and not isinstance(value, (IntervalSweep, RangeSweep)):
        raise ValueError(f"{key}: tag(log, ...) applies to interval(lo, hi) or range(lo, hi), got {override.input_line!r}")
    if isinstance(value, ChoiceSweep):
        choices = [_plain(x) for x in value.list]
        for c in choices:
            if not isinstance(c, (type(None), bool, int, float, str)):
                raise ValueError(
                    f"{key}: choices must be null, bool, int, float or str (Optuna categoricals), got {c!r}"
                )
        if value.shuffle:
            raise ValueError(f"{key}: shuffle(choice(...)) has no meaning for Optuna; drop shuffle()")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        if value.shuffle:
            raise ValueError(f"{key}: shuffle(range(...)) has no meaning for Optuna; drop shuffle()")
        # NOTE: hi is included (Optuna's high), as the official plugin does, unlike Hydra's own range()
        lo, hi, step = value.start, value.stop, value.step
        if "log" in value.tags:
            if not (isinstance(lo, int) and isinstance(hi, int) and step == 1):
                raise ValueError(f"{key}: tag(log, range(lo, hi)) needs int bounds and no step, "
                                 f"got {override.input_line!r}; use tag(log, interval(lo, hi)) for floats")
            return IntDistribution(lo, hi, log=True)
        if lo is None or hi is None:
            raise ValueError(f"{key}: range() needs both bounds, got {override.input_line!r}")
        if isinstance(lo, int) and isinstance(hi, int) and isinstance(step, int):
            return IntDistribution(lo, hi, step=step)
        return FloatDistribution(float(lo), float(hi), step=float(step) if step is not None else None)
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        if value.start is None or value.end is None:
            raise ValueError(f"{key}: interval() needs both bounds, got {override.input_line!r}")
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise ValueError(f"{key}: unsupported sweep {override.input_line!r}; use choice, range, interval or tag(log, ...)")


def parse_params(params: Mapping[str, str] | None, arguments: Iterable[str] = ()) -> tuple[
        dict[str, BaseDistribution], dict[str, Any], list[str]]:
    """Split ``hydra.sweeper.params`` and the command line into (search space, fixed values, other overrides).

    Fixed values are kept as the text written after ``=``.

    Command-line arguments win over ``params`` for the same key. Group choices (``model=mlp``) and
    ``hydra.*`` overrides that are not sweeps are passed through untouched in ``other``.

    >>> space, fixed, other = parse_params({"model.d_block": "choice(64, 128)", "optimizer.lr": "tag(log, interval(1e-4, 1e-2))"})
    >>> space["optimizer.lr"]
    FloatDistribution(high=0.01, log=True, low=0.0001, step=None)
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    lines = [f"{k}={v}" for k, v in (params or {}).items()]
    from_params = parser.parse_overrides(lines)
    from_args = parser.parse_overrides(list(arguments))
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, Any] = {}
    other: list[str] = []
    for override, from_cli in [(o, False) for o in from_params] + [(o, True) for o in from_args]:
        key = override.get_key_element()
        if from_cli and not override.is_sweep_override():
            # keep the argument as typed (group choices, +key=..., ~key); it overrides a params entry
            space.pop(key, None)
            fixed.pop(key, None)
            other.append(str(override.input_line))
            continue
        space.pop(key, None)
        fixed.pop(key, None)
        dist = distribution_from_override(override)
        if isinstance(dist, BaseDistribution):
            space[key] = dist
        else:
            fixed[key] = dist
    return space, fixed, other


def suggest(trial: Any, name: str, dist: BaseDistribution) -> Any:
    """Ask ``trial`` for ``name`` with the public suggest API (the sampler sees the same distribution)."""
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    raise TypeError(f"{name}: unsupported distribution {dist!r}")


def format_value(value: Any) -> str:
    """A Python value -> the text of a Hydra override value that parses back to the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as a Hydra override value")


def quote(text: str) -> str:
    """Single-quote ``text`` for a Hydra override (commas, braces, colons and quotes survive)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def grid_search_space(space: Mapping[str, BaseDistribution]) -> dict[str, list[Any]]:
    """The ``search_space`` a GridSampler needs: every searched key must be a choice (or an int range)."""
    grid: dict[str, list[Any]] = {}
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            grid[name] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            grid[name] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, FloatDistribution) and dist.step is not None and not dist.log:
            # range(-1.0, 1.0, step=1): low, low + step, ... up to high included (as Optuna's stepped float)
            n = int(round((dist.high - dist.low) / dist.step))
            grid[name] = [dist.low + i * dist.step for i in range(n + 1)]
        else:
            raise ValueError(f"the grid sampler needs choice(...) or a range(...) for every param; {name} is {dist}")
    return grid
