"""A sweep's trials as the study holds them: which to run (`plan`: a grid's unfinished cells, or
the parameters of failed trials again), what was left running by a sweep that stopped (`recover`),
a trial's command line (`trial_overrides`) and the sweep's closing line (`summary`). The
scheduler (scheduler.py) runs them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from launching.sweeper.parent_run import END_ATTR, ParentRun
from launching.sweeper.search_space import cell_key, override_value
from launching.sweeper.study import best_trial
from soda.record import trial_run_name

log = logging.getLogger(__name__)

ERROR_ATTR = "error"  # trial user attribute: why the trial failed (read by the tests)
INTERRUPTED = "interrupted: the sweep stopped before the trial finished"
STOPPED = "interrupted: the sweep was stopped"
STORAGE_LOST = "interrupted: the sweep lost its Optuna storage"
TRACKING_LOST = "interrupted: the sweep lost its MLflow tracking store"
FINISHED_OK = ("COMPLETE", "PRUNED")


@dataclass
class SweepState:
    target: int  # trials the study should have finished (complete or pruned)
    done: int  # finished so far, earlier runs of the sweep included
    allowed_failures: int  # failures in this run that stop the sweep when exceeded
    failures: int = 0
    errors: list[str] = field(default_factory=list)  # one line per failed trial, for the summary

    def stopping(self, in_flight: int) -> bool:
        return self.failures > self.allowed_failures or self.done + in_flight >= self.target


def plan(trials, names: list[str], cells: list[dict[str, Any]] | None, n_trials: int | None):
    """(target, trials already finished, parameters to run first) for a study's `trials`.

    A grid (`cells`) runs each cell not finished yet; other samplers first run again the
    parameters of earlier failed trials, then ask the sampler for new ones."""
    done = [t for t in trials if t.state.name in FINISHED_OK]
    if cells is not None:
        done_keys = {cell_key(t.params, names) for t in done}
        target = min(n_trials or len(cells), len(cells))
        queue = [c for c in cells if cell_key(c, names) not in done_keys]
    else:
        target = n_trials
        queue = _retries(trials, names)
    return target, len(done), queue[: max(0, target - len(done))]


def _retries(trials, names: list[str]) -> list[dict[str, Any]]:
    """Parameters of earlier failed trials that never succeeded, once each. A point is all of a
    trial's parameters, what a custom search space suggested included: enqueued again, its
    suggestions take those values again."""
    seen = {cell_key(t.params, sorted(t.params)) for t in trials if t.state.name in FINISHED_OK}
    queue = []
    for trial in trials:
        key = cell_key(trial.params, sorted(trial.params))
        if trial.state.name == "FAIL" and set(names) <= set(trial.params) and key not in seen:
            queue.append(dict(trial.params))
            seen.add(key)
    return queue


def recover(study, storage, parent: ParentRun) -> None:
    """Trials left running (or queued) by a sweep that stopped without finishing them. One whose
    own run ended complete or pruned (its job ended; the sweeper was killed before it told
    Optuna) is recorded as such; the others are marked failed, with the error their run ended with
    (say, the storage was lost) or else as interrupted, and `plan` runs them again. `storage` is
    the study's opened storage."""
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        if trial.state == TrialState.WAITING:
            study.ask()  # takes the oldest waiting trial: that one (tell needs it running)
        else:
            result = parent.trial_result(trial.number)
            if result is not None:
                outcome, values = result
                study.tell(trial.number, values, state=TrialState[outcome])
                parent.trial_ended(trial.number, outcome, values)
                log.info("trial %d had ended %s before the sweep stopped: kept", trial.number, outcome.lower())
                continue
        why = study.user_attrs.get(END_ATTR) or INTERRUPTED  # the sweep's own reason, when it left one
        error = (trial.state == TrialState.RUNNING and parent.trial_error(trial.number)) or why
        storage.set_trial_user_attr(trial_id, ERROR_ATTR, error[:4000])
        study.tell(trial.number, state=TrialState.FAIL)
        parent.close_child(trial.number, "KILLED", why, trial.params)
        log.info("trial %d was interrupted earlier (%s): marked failed, it will run again", trial.number, error)
    if study.user_attrs.get(END_ATTR):
        study.set_user_attr(END_ATTR, "")  # recorded: the parent run's previous_end and its trials say it


def summary(study, state: SweepState) -> str:
    """One line: the study's trials by state, this run's failures, and the best trial."""
    counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    names = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}
    text = (
        f"sweep {study.study_name}: {len(trials)} trials in the study "
        f"({', '.join(f'{n} {names.get(s, s.lower())}' for s, n in counts.items())}); this run: "
        f"{state.failures} failed"
    )
    if state.errors:
        text += f" [{'; '.join(state.errors[:5])}{'; ...' if len(state.errors) > 5 else ''}]"
    best = best_trial(study)
    if best:
        values = ", ".join(number_text(v) for v in best.values)
        params = " ".join(f"{k}={override_value(v)}" for k, v in best.params.items())
        text += f"; best trial #{best.number}: {values} with {params}"
    return text


def trial_overrides(
    fixed: list[str], params: dict[str, Any], study_name: str, storage: str, number: int, parent_run_id: str
) -> list[str]:
    """A trial's command line: the fixed overrides, its parameters, where it reports to, and its
    MLflow run's name (its study, number and values), unless the command line names the run."""
    named = any(override.lstrip("+").startswith("tracking.run_name=") for override in fixed)
    naming = [] if named else [f"tracking.run_name={override_value(trial_run_name(study_name, number, params))}"]
    return [
        *fixed,
        *(f"{name}={override_value(value)}" for name, value in params.items()),
        *naming,
        f"sweep.study_name={override_value(study_name)}",
        f"sweep.storage={override_value(storage)}",
        f"sweep.trial={number}",
        f"sweep.parent_run_id={override_value(parent_run_id)}",
    ]


def number_text(value: float) -> str:
    return f"{value:.4g}"
