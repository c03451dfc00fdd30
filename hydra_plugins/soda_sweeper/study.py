"""The Optuna study of a sweep: created, or continued when one of the same name exists in the
storage, as long as it optimises the same directions over the same search space with the same
fixed settings (what every trial shares: experiment, model, data set, the views not swept,
schedule): a demo-size run of a sweep must not pass for the reference one."""

import logging
from collections.abc import Iterable
from typing import Any

from soda.errors import first_line
from soda.sweep import PRUNER_ATTR, SweepError, make_pruner
from soda.tracking import flatten

log = logging.getLogger(__name__)

SPACE_ATTR = "soda_search_space"  # study user attribute: {name: spec}, checked on resume
FIXED_ATTR = "soda_fixed_settings"  # study user attribute: {config path: value}, checked on resume
# Where and how a trial runs, not what it runs: these may differ between the runs of one study.
RUNNING_KEYS = (
    "sweep",
    "tracking",
    "data_root",
    "device",
    "dataset.root",
    "dataset.download",
    "schedule.compile",
    "schedule.channels_last",
    "schedule.checkpoint_every",
    "schedule.log_every",
)
SHOWN_DIFFERENCES = 4


def fixed_settings(config: dict[str, Any], swept: Iterable[str]) -> dict[str, str]:
    """The run config's values that every trial of the sweep shares, flat ({"model.name": "tiny"}):
    all but those the sweep varies (`swept`: its dimensions' names, a config path or a group with
    its @package) and RUNNING_KEYS."""
    paths = [name.split("@", 1)[1] if "@" in name else name.replace("/", ".") for name in swept]
    skipped = (*RUNNING_KEYS, *paths)
    return {
        key: value
        for key, value in flatten(config).items()
        if not any(key == path or key.startswith(f"{path}.") for path in skipped)
    }


def _check_fixed(study, fixed: dict[str, str]) -> None:
    recorded = study.user_attrs.get(FIXED_ATTR)
    advice = "run it with the same settings to resume it, or give another sweep.study_name for a study of its own"
    if recorded is None:
        if study.get_trials(deepcopy=False):
            raise SweepError(
                f"study {study.study_name} has trials from a version that did not record their fixed settings, "
                f"so they may not be this sweep's; give another sweep.study_name for a study of its own"
            )
        return
    if recorded == fixed:
        return
    keys = [*fixed, *(key for key in recorded if key not in fixed)]
    differences = [
        f"{key}={fixed.get(key, '(unset)')} (the study's: {recorded.get(key, '(unset)')})"
        for key in keys
        if fixed.get(key) != recorded.get(key)
    ]
    more = len(differences) - SHOWN_DIFFERENCES
    shown = ", ".join(differences[:SHOWN_DIFFERENCES]) + (f" and {more} more" if more > 0 else "")
    raise SweepError(f"study {study.study_name} was run with other fixed settings: {shown}; {advice}")


def open_study(
    study_name: str,
    storage,
    directions: list[str],
    space: dict[str, str],
    sampler,
    pruner: dict[str, Any],
    fixed: dict[str, str] | None = None,
):
    """The study `study_name` in `storage` (an opened Optuna storage), created if new.

    `space` maps each dimension to its spec as written; `sampler` is an Optuna sampler
    (sampler.make_sampler); `pruner` the sweeper's settings ({name, options}); `fixed` the
    settings every trial shares (fixed_settings), checked against the study's when given."""
    import optuna

    try:
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            sampler=sampler,
            pruner=make_pruner(pruner["name"], pruner.get("options")),
            directions=directions,
            load_if_exists=True,
        )
    except SweepError:
        raise
    except Exception as error:
        raise SweepError(f"study {study_name}: {first_line(error, limit=1000)}") from None

    # A study continued with other directions or another space would mix incomparable trials.
    existing_directions = [d.name.lower() for d in study.directions]
    if existing_directions != directions:
        raise SweepError(
            f"study {study_name} exists with direction(s) {existing_directions}, "
            f"not {directions}; use another sweep.study_name"
        )
    existing = study.user_attrs.get(SPACE_ATTR)
    if existing is not None and existing != space:
        raise SweepError(
            f"study {study_name} exists with another search space ({existing}); use another sweep.study_name"
        )
    if fixed is not None:
        _check_fixed(study, fixed)
        study.set_user_attr(FIXED_ATTR, fixed)
    study.set_user_attr(SPACE_ATTR, space)
    # The trials' own processes build the same pruner from this (soda.sweep.TrialReporter).
    study.set_user_attr(PRUNER_ATTR, {"name": pruner["name"], "options": pruner.get("options")})
    return study


def best_trial(study):
    """The best complete trial (the first of the Pareto front for several objectives), or None."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return None
    if len(study.directions) > 1:
        return study.best_trials[0] if study.best_trials else None
    return study.best_trial
