"""The search space: the sweep file's `params` and the command line's sweep overrides, in Hydra's
override syntax, as Optuna distributions (and, for choices and ranges, the values of a grid).

`params` maps a config path (or config group, with its @package) to `choice(a, b)`,
`range(0, 3)`, `interval(1e-4, 1e-2)`, `tag(log, interval(...))`, `tag(int, interval(1, 8))`,
or a plain value that every trial gets. Sweep-syntax overrides on the command line (`seed=0,1,2`)
add dimensions too, and replace a dimension of the same name.
"""

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

from soda.errors import first_line
from soda.sweep import SweepError


@dataclass
class Dimension:
    name: str  # the override key: a config path or group (with @package)
    spec: str  # as written
    distribution: Any  # an optuna distribution
    grid: list[Any] | None  # the values along a grid axis; None for an interval


def parse_space(params: dict[str, Any], arguments: list[str]) -> tuple[dict[str, Dimension], list[str]]:
    """(dimensions by name, fixed overrides) from the sweep file's params and the command line."""
    parser = OverridesParser.create()
    lines = [f"{key}={spec_text(value)}" for key, value in params.items()] + list(arguments)
    dimensions: dict[str, Dimension] = {}
    fixed: list[str] = []
    for line in lines:
        try:
            override = parser.parse_override(line)
        except Exception as error:
            raise SweepError(f"sweep parameter {line!r}: {first_line(error, limit=1000)}") from None
        name = override.get_key_element()
        if override.is_sweep_override():
            spec = line.split("=", 1)[1] if "=" in line else line
            dimensions[name] = _dimension(name, spec, override)
        else:
            # A plain value on the command line pins a dimension the sweep file varies.
            fixed.append(line)
            dimensions.pop(name, None)
    return dimensions, fixed


def _dimension(name: str, spec: str, override) -> Dimension:
    import optuna.distributions as d

    value = override.value()
    if isinstance(value, ChoiceSweep | RangeSweep):
        values = [_primitive(v, name) for v in override.sweep_iterator()]
        if not values:
            raise SweepError(f"sweep parameter {name}={spec} has no values (an empty grid)")
        if len(set(map(repr, values))) != len(values):
            raise SweepError(f"sweep parameter {name}={spec} repeats a value")
        # An evenly spaced integer range is ordered: samplers that model order (TPE, CMA-ES) use it.
        if isinstance(value, RangeSweep) and all(isinstance(v, int) for v in values) and "log" not in value.tags:
            step = values[1] - values[0] if len(values) > 1 else 1
            distribution = d.IntDistribution(min(values), max(values), step=abs(step) or 1)
        else:
            distribution = d.CategoricalDistribution(values)
        return Dimension(name, spec, distribution, values)
    if isinstance(value, IntervalSweep):
        low, high, log_scale = value.start, value.end, "log" in value.tags
        if not low < high:
            raise SweepError(f"sweep parameter {name}={spec}: the interval is empty (needs low < high)")
        if log_scale and low <= 0:
            raise SweepError(f"sweep parameter {name}={spec}: a log interval needs low > 0")
        if "int" in value.tags:
            distribution = d.IntDistribution(int(low), int(high), log=log_scale)
        else:
            distribution = d.FloatDistribution(float(low), float(high), log=log_scale)
        return Dimension(name, spec, distribution, None)
    raise SweepError(f"sweep parameter {name}={spec}: use choice(...), range(...) or interval(...)")


def _primitive(value: Any, name: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise SweepError(f"sweep parameter {name}: {value!r} is not a plain value (number, string, bool or null)")


def spec_text(value: Any) -> str:
    """A sweep file's value as override text (YAML turned `true` into True, `null` into None)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_./\-]*")


def override_value(value: Any) -> str:
    """A value written so that Hydra's override parser reads it back with the same type."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if _BARE.fullmatch(text) and text.lower() not in ("true", "false", "null", "nan", "inf"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def cell_key(params: dict[str, Any], names: list[str]) -> tuple:
    """The identity of a point in the space (a grid cell): same values, same key."""
    return tuple(repr(params.get(name)) for name in names)


def grid_cells(dimensions: dict[str, Dimension]) -> list[dict[str, Any]]:
    """Every combination of the dimensions' values, in order."""
    interval = [d.name for d in dimensions.values() if d.grid is None]
    if interval:
        raise SweepError(f"the grid sampler needs choice(...) or range(...); {', '.join(interval)} is an interval")
    names = list(dimensions)
    return [
        dict(zip(names, values, strict=True)) for values in itertools.product(*(d.grid for d in dimensions.values()))
    ]


def check_every_value(dimensions: dict[str, Dimension], fixed: list[str], compose: Callable[[list[str]], Any]) -> None:
    """Compose a trial for every value each parameter can take (the others at their first value),
    before any job is launched: a misspelt path or a value out of range fails here, in one line.
    `compose(overrides)` raises when the overrides do not make a valid run config."""
    first = {name: (d.grid[0] if d.grid else d.distribution.low) for name, d in dimensions.items()}
    probes = [dict(first)]
    for name, dim in dimensions.items():
        values = dim.grid if dim.grid is not None else [dim.distribution.low, dim.distribution.high]
        probes.extend({**first, name: value} for value in values[1:])
    for probe in probes:
        try:
            compose([*fixed, *(f"{n}={override_value(v)}" for n, v in probe.items())])
        except Exception as error:
            # Name the value that broke it (all of them for the first probe, which changes none).
            changed = [f"{n}={override_value(v)}" for n, v in probe.items() if v != first[n]] or [
                f"{n}={override_value(v)}" for n, v in probe.items()
            ]
            raise SweepError(
                f"sweep trial with {' '.join(changed)} cannot be composed: {first_line(error, limit=1000)}"
            ) from None
