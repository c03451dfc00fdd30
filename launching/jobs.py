"""A launch's jobs: from launch.py's command line to each job's composition, and from a
composition to the settings the job will run with.

`job_settings` is the one way a composition becomes a job's settings: launch.py's checks
(check_launch, what `--cfg job` and the docs' tests use), the dry run, the launchers and the
sweeper all go through it, so that what they refuse is what the job itself would refuse
(soda.train.run calls soda.config.to_settings first thing).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from launching.adapters.hydra import parse_launch_arguments
from soda.config import CONF_DIR, Config, compose_raw, to_settings
from soda.errors import ConfigError


def without_hydra(composed: DictConfig) -> DictConfig:
    """The run's config: a composition without Hydra's own `hydra` node."""
    return OmegaConf.masked_copy(composed, [key for key in composed if key != "hydra"])


def job_settings(composed: DictConfig) -> Config:
    """A job's validated settings from its composition (Hydra's `hydra` node may be in it and is
    left out), as the job will read them; a bad value is a one-line ConfigError."""
    return to_settings(without_hydra(composed))


def plain_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that are not sweeps (`seed=0,1`, `choice(...)`), as Hydra parses them: what
    the launch's own composition (its sweeper, its launcher) is made from."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [override.input_line for override in parsed if not override.is_sweep_override()]


def compose_as_launched(arguments: Sequence[str], overrides: Sequence[str] | None = None) -> DictConfig:
    """The composition, Hydra's node included, that `python launch.py <arguments>` makes (its
    --config-path, --config-name, --config-dir), with `overrides` in place of the command line's
    when given (one job of a sweep). Hydra's errors are raised as they are."""
    args = parse_launch_arguments(arguments)
    # --config-path is relative to launch.py (the repository root), as hydra.main takes it.
    config_dir = (CONF_DIR.parent / args.config_path).resolve() if args.config_path else CONF_DIR
    # --config-dir: one more folder of configs, searched before conf/.
    search = [f"hydra.searchpath=[file://{Path(args.config_dir).resolve()}]"] if args.config_dir else []
    chosen = list(args.overrides if overrides is None else overrides)
    return compose_raw([*chosen, *search], config_name=args.config_name or "config", config_dir=config_dir)


def refuse_a_sweep_without_multirun(sweep: str | None, overrides: Sequence[str]) -> None:
    """A sweep file sets hydra.sweeper, which only -m uses: without it, it would be one plain run."""
    if sweep is not None:
        command = " ".join(["python launch.py -m", *overrides])
        raise ConfigError(f"sweep={sweep} is a sweep: run it with -m ({command})")


def check_launch(arguments: Sequence[str]) -> list[list[str]]:
    """What `python launch.py <arguments>` checks before any work, done without running anything:
    the run's config composed and validated (job_settings); with -m, that of each job of the sweep,
    as the launchers check them before submitting (sweep_jobs: an interval at its lower end only).
    Returns each job's overrides. Hydra's composition errors are raised as they are (launch.py
    prints them as one line, as it does for a run); a bad value is a ConfigError."""
    args = parse_launch_arguments(arguments)
    overrides = list(args.overrides)
    if not args.multirun:
        composed = compose_as_launched(arguments, overrides)
        refuse_a_sweep_without_multirun(OmegaConf.select(composed, "hydra.runtime.choices.sweep"), overrides)
        job_settings(composed)
        return [overrides]

    sweeper = compose_as_launched(arguments, plain_overrides(overrides)).hydra.sweeper
    jobs = sweep_jobs(OmegaConf.to_container(sweeper).get("params") or {}, overrides)
    for number, job in enumerate(jobs):
        try:
            job_settings(compose_as_launched(arguments, job))
        except ConfigError as error:
            raise ConfigError(f"{error} (in job {number} of {len(jobs)}: {' '.join(job)})") from None
    return jobs


def sweep_jobs(params: dict[str, Any], arguments: Sequence[str]) -> list[list[str]]:
    """Each job of a sweep as its overrides: every combination of the values of the sweep's
    params (hydra.sweeper.params, from a sweep file) and of the sweep overrides among `arguments`
    (`seed=0,1,2`, `choice(...)`, `range(...)`), parsed as the sweeper parses them (its
    search_space: a plain value on the command line pins a parameter the params vary, and a sweep
    there replaces it). An interval(...) has no finite set of points: it contributes its lower end."""
    from launching.sweeper.search_space import override_value, parse_space

    dimensions, fixed = parse_space(params, list(arguments))
    axes = {name: dim.grid if dim.grid is not None else [dim.distribution.low] for name, dim in dimensions.items()}
    return [
        [*fixed, *(f"{name}={override_value(value)}" for name, value in zip(axes, point, strict=True))]
        for point in itertools.product(*axes.values())
    ]


def check_shown_config(arguments: Sequence[str]) -> tuple[list[str], str | None]:
    """`--cfg job|hydra|all` prints a run's config instead of running it: check that run first (check_launch),
    so that the dry check before a long job refuses what the job would. Hydra cannot print a
    multirun's config: with -m, every job is checked and the arguments returned print the first
    job's. Returns the arguments for Hydra and a note for the user (None when there is nothing to
    add); other arguments come back as they are."""
    args = parse_launch_arguments(arguments)
    if args.cfg not in ("job", "all", "hydra") or args.help or args.hydra_help or args.info or args.shell_completion:
        return list(arguments), None
    jobs = check_launch(arguments)
    if not args.multirun:
        return list(arguments), None
    # Hydra's parser takes the overrides as one run of words: the first job's go first, the flags after.
    overrides = set(args.overrides)
    flags = [argument for argument in arguments if argument not in overrides and argument not in ("-m", "--multirun")]
    what = "the sweep's only job" if len(jobs) == 1 else f"all {len(jobs)} jobs of the sweep"
    return [*jobs[0], *flags], f"checked {what}; shown: job 0 ({' '.join(jobs[0]) or 'no overrides'})"


def command_line_flag(arguments: Sequence[str], key: str) -> bool | None:
    """The value the command line gives a boolean flag (`hydra.launcher.dry_run=1`, `+key=on`), its
    last one parsed as Hydra parses an override and read by parse_flag, the launchers'
    rule; None when it gives none."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = [a for a in arguments if re.fullmatch(rf"\+{{0,2}}{re.escape(key)}=.*", a, flags=re.DOTALL)]
    if not given:
        return None
    override = OverridesParser.create().parse_overrides([given[-1]])[0]
    value = given[-1].split("=", 1)[1] if override.is_sweep_override() else override.value()
    return parse_flag(key, value, text=given[-1].split("=", 1)[1])


@dataclass
class _Flag:
    value: bool = False


def parse_flag(key: str, value: Any, text: str | None = None) -> bool:
    """A boolean flag's value (`hydra.launcher.dry_run`, ...) as OmegaConf reads it into a `bool`
    field, which is how the launchers get it: true/false, yes/no, y/n, on/off in any case, and
    integers (0 is false, any other true). The one rule for every boolean flag, so that launch.py
    never reads one way what a launcher reads another; anything else is a one-line ConfigError
    (quoting `text`, the value as the user wrote it, when given)."""
    from omegaconf.errors import ValidationError

    flag = OmegaConf.structured(_Flag)
    try:
        flag.value = value
    except ValidationError:
        raise ConfigError(
            f"{key}={value if text is None else text} is neither true nor false; give true or false (yes/no, on/off and 1/0 are read too)"
        ) from None
    return bool(flag.value)
