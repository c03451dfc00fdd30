"""The Optuna study of a sweep: created, or continued when one of the same name exists in the
storage, as long as it optimises the same directions over the same search space."""

import logging
from typing import Any

from soda.errors import first_line
from soda.sweep import PRUNER_ATTR, SweepError, make_pruner

log = logging.getLogger(__name__)

SPACE_ATTR = "soda_search_space"  # study user attribute: {name: spec}, checked on resume


def open_study(
    study_name: str,
    storage,
    directions: list[str],
    space: dict[str, str],
    sampler,
    pruner: dict[str, Any],
):
    """The study `study_name` in `storage` (an opened Optuna storage), created if new.

    `space` maps each dimension to its spec as written; `sampler` is an Optuna sampler
    (sampler.make_sampler); `pruner` the sweeper's settings ({name, options})."""
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
