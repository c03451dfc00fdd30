"""The Optuna study of a sweep: created, or continued when one of the same name exists in the
storage, as long as it optimises the same directions over the same search space with the same
fixed settings (what every trial shares: experiment, model, data set, the views not swept,
schedule): a demo-size run of a sweep must not pass for the reference one.

The study also records its sweep settings (sweep_settings: sampler, pruner, trials in flight,
trial count, failure rate). Those that decide which trials it runs (the sampler and its seed and
arguments, the pruner, and for a seeded sampler other than the grid the number of trials in
flight, as the sequence it asks for depends on when results come back) may change on resume only
with hydra.sweeper.resume_with_changes=true; the others (more or fewer trials, another failure
rate) may always change. Each change is returned for the sweep's MLflow run to record."""

import logging
from collections.abc import Iterable
from typing import Any

from launching.sweeper.sampler import GRID, SamplerSpec
from soda.errors import first_line
from soda.record import flatten
from soda.sweep import PRUNER_ATTR, SweepError, make_pruner

log = logging.getLogger(__name__)

SPACE_ATTR = "soda_search_space"  # study user attribute: {name: spec}, checked on resume
FIXED_ATTR = "soda_fixed_settings"  # study user attribute: {config path: value}, checked on resume
SETTINGS_ATTR = "soda_sweep_settings"  # study user attribute: sweep_settings, checked on resume
SAMPLER_KEY = "hydra/sweeper/sampler"  # in sweep_settings: the sampler's class
SEED_KEY = "hydra.sweeper.sampler.seed"
N_JOBS_KEY = "sweep.n_jobs"
# Sweep settings that change how many trials run or when the sweep gives up, not which ones.
FREE_TO_CHANGE = ("sweep.n_trials", "sweep.max_failure_rate")
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
    "peer_timeout_s",
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
    shown = _shown(_differences(recorded, fixed))
    raise SweepError(f"study {study.study_name} was run with other fixed settings: {shown}; {advice}")


def _differences(recorded: dict[str, str], new: dict[str, str]) -> dict[str, tuple[str, str]]:
    """{key: (recorded value, new value)} for each key whose value differs, new keys first."""
    keys = [*new, *(key for key in recorded if key not in new)]
    return {
        key: (recorded.get(key, "(unset)"), new.get(key, "(unset)"))
        for key in keys
        if new.get(key) != recorded.get(key)
    }


def _shown(differences: dict[str, tuple[str, str]]) -> str:
    """The first SHOWN_DIFFERENCES as `key=new (the study's: old)`, and how many more."""
    texts = [f"{key}={new} (the study's: {old})" for key, (old, new) in differences.items()]
    more = len(texts) - SHOWN_DIFFERENCES
    return ", ".join(texts[:SHOWN_DIFFERENCES]) + (f" and {more} more" if more > 0 else "")


def sweep_settings(
    sampler: SamplerSpec, pruner: dict[str, Any], n_jobs: int, n_trials: int | None, max_failure_rate: float
) -> dict[str, str]:
    """How the sweep picks and runs its trials, flat, each named as the command line sets it."""
    return {
        SAMPLER_KEY: sampler.target,
        **{f"hydra.sweeper.sampler.{key}": str(value) for key, value in sorted(sampler.kwargs.items())},
        "hydra.sweeper.pruner.name": str(pruner["name"]),
        **flatten(pruner.get("options") or {}, "hydra.sweeper.pruner.options."),
        N_JOBS_KEY: str(n_jobs),
        "sweep.n_trials": str(n_trials),
        "sweep.max_failure_rate": str(max_failure_rate),
    }


def check_sweep_settings(study, settings: dict[str, str], resume_with_changes: bool) -> dict[str, tuple[str, str]]:
    """The sweep settings that differ from those the study recorded, {key: (old, new)}. One-line
    SweepError when one of them changes which trials the study runs (see the module docstring)
    and `resume_with_changes` is false. A study that recorded none (new, or from an earlier
    version) has no differences. The caller records `settings` once the change is recorded."""
    recorded = study.user_attrs.get(SETTINGS_ATTR)
    if recorded is None:
        return {}
    differences = _differences(recorded, settings)
    seeded = settings.get(SEED_KEY, "None") != "None" and settings.get(SAMPLER_KEY) != GRID
    refused = {
        key: change
        for key, change in differences.items()
        if key not in FREE_TO_CHANGE and (key != N_JOBS_KEY or seeded)
    }
    if refused and not resume_with_changes:
        raise SweepError(
            f"study {study.study_name} was run with other sweep settings: {_shown(refused)}; they change which "
            "trials it runs: resume it with the study's settings, add hydra.sweeper.resume_with_changes=true to "
            "continue it with these (its MLflow run records the change), or give another sweep.study_name"
        )
    return differences


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
