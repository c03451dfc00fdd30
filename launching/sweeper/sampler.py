"""The sweep's Optuna sampler, from either form of `hydra.sweeper.sampler`, and the custom
search space function.

The group form, as in the published hydra-optuna-sweeper: `hydra/sweeper/sampler=tpe` (or
`- override /hydra/sweeper/sampler: tpe` in a sweep file) puts conf/hydra/sweeper/sampler/tpe.yaml
there: `_target_: optuna.samplers.TPESampler` and the sampler's keyword arguments, each settable
on the command line (`hydra.sweeper.sampler.n_startup_trials=4`). The older form, which sweep files
written before the group keep using: `{name: tpe, seed: 0, options: {...}}`, with the short names
of LEGACY. Neither (null): TPE with Optuna's defaults, the older form's default.

A grid (GridSampler, or the older `name: grid`) runs every combination of `params`' values once,
in order: the sweeper enqueues each cell, and the sampler that asks for the trial only fills in
what a custom search space suggests, so it is a RandomSampler (seeded when `seed` is given).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from soda.errors import first_line
from soda.sweep import SweepError

GRID = "optuna.samplers.GridSampler"
# The older form's names (`nsga2`, not the group's `nsgaii`: sweep files use it).
LEGACY = {
    "grid": GRID,
    "tpe": "optuna.samplers.TPESampler",
    "random": "optuna.samplers.RandomSampler",
    "cmaes": "optuna.samplers.CmaEsSampler",
    "nsga2": "optuna.samplers.NSGAIISampler",
    "qmc": "optuna.samplers.QMCSampler",
}
LEGACY_KEYS = ("name", "seed", "options")
# Keys of the group form that are Hydra's instructions, not the sampler's arguments.
HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


@dataclass
class SamplerSpec:
    name: str  # what logs and the parent run call it: the group's option, or the older form's name
    target: str  # the sampler's class
    kwargs: dict[str, Any] = field(default_factory=dict)  # its keyword arguments

    @property
    def grid(self) -> bool:
        return self.target == GRID


def sampler_spec(node: Any, choice: str | None) -> SamplerSpec:
    """The sampler `hydra.sweeper.sampler` (a plain dict or None) describes; `choice` is the
    option picked in the group hydra/sweeper/sampler, if any. One-line SweepError when the node
    mixes both forms or names a sampler the older form does not know."""
    if node is None:
        return SamplerSpec("tpe", LEGACY["tpe"])
    if not isinstance(node, dict):
        raise SweepError(
            f"hydra.sweeper.sampler={node!r}: use hydra/sweeper/sampler=<option> or {{name, seed, options}}"
        )
    if "_target_" in node:
        mixed = sorted(set(node) & {"name", "options"})
        if mixed:
            picked = f"hydra/sweeper/sampler={choice}" if choice else "_target_"
            raise SweepError(
                f"hydra.sweeper.sampler mixes the group form ({picked}) with the older form's "
                f"{', '.join(mixed)}: set the sampler's arguments as hydra.sweeper.sampler.<argument>, "
                "or drop the group option and use {name, seed, options}"
            )
        kwargs = {key: value for key, value in node.items() if key not in HYDRA_KEYS}
        target = str(node["_target_"])
        return SamplerSpec(choice or target.rsplit(".", 1)[-1], target, kwargs)
    unknown = sorted(set(node) - set(LEGACY_KEYS))
    if unknown:
        raise SweepError(
            f"hydra.sweeper.sampler has {', '.join(unknown)}, which the form {{name, seed, options}} does not "
            "know: put a sampler's arguments under options, or pick hydra/sweeper/sampler=<option>"
        )
    name = str(node.get("name", "tpe"))
    if name not in LEGACY:
        raise SweepError(
            f"sampler {name!r} is not known; allowed: {', '.join(LEGACY)} "
            "(or any Optuna sampler with hydra/sweeper/sampler=<option>)"
        )
    return SamplerSpec(name, LEGACY[name], {"seed": node.get("seed"), **dict(node.get("options") or {})})


def make_sampler(spec: SamplerSpec):
    """The Optuna sampler of `spec`; one-line SweepError when it cannot be built."""
    import optuna
    from hydra.utils import instantiate

    if spec.grid:
        return optuna.samplers.RandomSampler(seed=spec.kwargs.get("seed"))
    try:
        sampler = instantiate({"_target_": spec.target, **spec.kwargs}, _convert_="all")
    except Exception as error:
        # Hydra wraps the sampler's own error (a misspelt argument, a missing package) in its own.
        cause = error.__cause__ or error
        raise SweepError(f"sampler {spec.name} ({spec.target}): {first_line(cause, limit=1000)}") from None
    if not isinstance(sampler, optuna.samplers.BaseSampler):
        raise SweepError(f"sampler {spec.name}: {spec.target} is not an Optuna sampler")
    return sampler


def custom_search_space(path: str | None) -> Callable | None:
    """The function `path` (`<module>.<function>`) names, or None; one-line SweepError when it
    cannot be imported or is not a function."""
    if not path:
        return None
    from hydra.utils import get_method

    try:
        return get_method(path)
    except Exception as error:
        cause = error.__cause__ or error
        raise SweepError(
            f"hydra.sweeper.custom_search_space={path}: {first_line(cause, limit=1000)} "
            "(give <module>.<function>, importable from where you launch)"
        ) from None
