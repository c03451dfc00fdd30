"""The sweep's MLflow run, parent of its trials' runs.

Its settings are params, the base config and the sweeper's config artifacts; each trial's end is a
point of its progress metrics; the best trial is a metric and tags at the end. The trials create
their own runs and tag themselves as its children (soda/train.py, trial_tags); this
module closes a trial's run when the trial's job could not (it died, or was interrupted), and
creates one for a trial that failed before its run started, so that every trial has one.

A trial's own run is the record of how it ended: a run that ended (FINISHED, FAILED, KILLED) keeps
its status, error and trial_state here (only a failed or killed one that has no trial_state gets
FAIL), and the sweeper reads a finished or pruned trial's outcome back from it when the job could
not hand it over (`trial_result`).

A sweep that could not finish records why: its run ends FAILED with the tag `error` (the Optuna
storage was lost), and the run that continues it moves that to `previous_end`. Sweep settings
changed on resume (study.check_sweep_settings) are the tag `resume_changes`, one line per resume
(`<time> key: old -> new, ...`): the params keep the values the sweep started with.
"""

import logging
import math
import re
from datetime import datetime, timezone
from typing import Any

from launching.sweeper.study import best_trial
from soda.errors import first_line
from soda.record import (
    ERROR,
    PREVIOUS_END,
    RESUME_CHANGES,
    RESUMED,
    STUDY,
    TRIAL,
    TRIAL_STATE,
    git_state,
    parent_tags,
    trial_run_name,
    trial_tags,
)
from soda.store import Store

log = logging.getLogger(__name__)

PARENT_ATTR = "soda_mlflow_parent"  # study user attribute: the sweep's MLflow run id
# Study user attribute: why the sweep stopped, where MLflow could not be told (its tracking store
# was lost); the run that continues the sweep records it and clears it (trials.recover).
END_ATTR = "soda_sweep_end"
BEST_TRIAL = "best_trial"
ENDED_STATUSES = ("FINISHED", "FAILED", "KILLED")  # MLflow statuses of a run that ended
# previous_end of a sweep run that nobody closed.
LOST = "lost: the sweeper ended without recording how (SIGKILL, a closed terminal or a lost node)"


class ParentRun:
    def __init__(self, store: Store, experiment_id: str, study_name: str, run_id: str, objectives: list[str]):
        self.store = store  # every read and write of the sweep's records (soda.store.Store)
        self.experiment_id = experiment_id
        self.study_name = study_name
        self.run_id = run_id
        self.objectives = list(objectives)  # the metrics a trial returns as its objective, in order

    @property
    def uri(self) -> str:
        return self.store.uri

    @classmethod
    def open(
        cls,
        uri: str,
        experiment: str,
        artifact_location: str | None,
        study,
        params: dict[str, str],
        artifacts: dict[str, str],
        objectives: list[str],
    ) -> "ParentRun":
        """The run recorded in the study (a resumed sweep), or a new one with `params` and
        `artifacts` (file name -> text). Fails, before any job starts, if the store is unusable.
        `objectives`: the metric names of the config's `objective` (a trial's value, in order)."""
        store = Store.checked(uri)
        experiment_id = store.experiment_id(experiment, artifact_location)
        run = store.find_run(study.user_attrs.get(PARENT_ATTR))
        if run is not None:
            run_id = run.info.run_id
            error = run.data.tags.get(ERROR)
            ended = (
                (study.user_attrs.get(END_ATTR) or LOST) if run.info.status == "RUNNING" else run.info.status.lower()
            )
            store.reopen(run_id)
            # The run is live again: why the sweep before this one ended is history now.
            store.set_tags(run_id, {RESUMED: "true", PREVIOUS_END: f"{ended}: {error}"[:5000] if error else ended})
            if error is not None:
                store.delete_tag(run_id, ERROR)
            return cls(store, experiment_id, study.study_name, run_id, objectives)

        run_id = store.create_run(
            experiment_id,
            study.study_name,
            tags={**parent_tags(study.study_name), **git_state()},
            params={mlflow_key(key): value[:6000] for key, value in params.items()},
            texts=artifacts,
        )
        study.set_user_attr(PARENT_ATTR, run_id)
        return cls(store, experiment_id, study.study_name, run_id, objectives)

    def record_changes(self, changes: dict[str, tuple[str, str]]) -> None:
        """Sweep settings that changed on resume, {key: (old, new)}, added to the run's
        resume_changes tag with the time."""
        if not changes:
            return
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        added = f"{now} " + ", ".join(f"{key}: {old} -> {new}" for key, (old, new) in changes.items())
        earlier = self.store.get_run(self.run_id).data.tags.get(RESUME_CHANGES, "")
        self.store.set_tags(self.run_id, {RESUME_CHANGES: "\n".join(filter(None, [earlier, added]))[-5000:]})
        log.info("study %s continues with other sweep settings: %s", self.study_name, added)

    def trial_ended(self, number: int, state: str, values: list[float] | None) -> None:
        """Count the trial's end (and its objective) as progress, at step = trial number."""
        metrics = {f"trials_{state.lower()}": 1.0}
        if values:
            metrics.update({f"trial_value_{i}" if i else "trial_value": v for i, v in enumerate(values)})
        try:
            self.store.log_metrics(self.run_id, metrics, step=number)
        except Exception as error:  # the sweep goes on; the trial's own run holds its record
            log.warning("could not record trial %d in the parent MLflow run: %s", number, first_line(error, 500))

    def trial_result(self, number: int) -> tuple[str, list[float] | None] | None:
        """How trial `number` ended, as its own run recorded it, when that is a result: ("COMPLETE",
        its objective values: each metric's last value) for a run FINISHED with trial_state
        COMPLETE, ("PRUNED", None) for one KILLED with trial_state PRUNED; None otherwise (no run,
        still running, failed, interrupted, an objective not recorded, or the store unreadable)."""
        try:
            runs = self._trial_runs(number)
        except Exception as problem:
            log.warning("could not read the MLflow run of trial %d: %s", number, first_line(problem, 500))
            return None
        ended: dict[tuple, Any] = {}  # (status, trial_state) -> the newest such run
        for run in runs:
            ended.setdefault((run.info.status, run.data.tags.get(TRIAL_STATE)), run)
        finished = ended.get(("FINISHED", "COMPLETE"))
        if finished is not None:
            values = [finished.data.metrics.get(name) for name in self.objectives]
            if values and all(v is not None and math.isfinite(v) for v in values):
                return "COMPLETE", values
        if ("KILLED", "PRUNED") in ended:
            return "PRUNED", None
        return None

    def trial_error(self, number: int) -> str | None:
        """Why trial `number`'s own run ended, when it ended without finishing (its `error` tag);
        None when it has none, is still running, or the store cannot be read."""
        try:
            runs = self._trial_runs(number)
        except Exception as problem:
            log.warning("could not read the MLflow run of trial %d: %s", number, first_line(problem, 500))
            return None
        for run in runs:
            if run.info.status in ("FAILED", "KILLED") and run.data.tags.get(ERROR):
                return run.data.tags[ERROR]
        return None

    def close_child(self, number: int, status: str, error: str, params: dict[str, Any] | None = None) -> None:
        """End the trial's own run as `status` (FAILED or KILLED) with `error`: its job died or
        was stopped before it could. The trial failed (Optuna's FAIL, its trial_state). A run that
        already ended keeps its status, error and trial_state; one that ended without a
        trial_state gets FAIL. A trial that failed before its run started gets a run here, so
        that every trial has one."""
        try:
            runs = self._trial_runs(number)
            if not runs:
                run_id = self.store.create_run(
                    self.experiment_id,
                    trial_run_name(self.study_name, number, params or {}),
                    tags=trial_tags(self.study_name, number, self.run_id),
                    params={mlflow_key(key): str(value) for key, value in (params or {}).items()},
                )
                runs = [self.store.get_run(run_id)]
            for run in runs:
                if run.info.status not in ENDED_STATUSES:
                    self.store.set_tags(run.info.run_id, {TRIAL_STATE: "FAIL", ERROR: error[:5000]})
                    self.store.end(run.info.run_id, status)
                elif run.info.status != "FINISHED" and TRIAL_STATE not in run.data.tags:
                    self.store.set_tags(run.info.run_id, {TRIAL_STATE: "FAIL"})
        except Exception as problem:
            log.warning("could not close the MLflow run of trial %d: %s", number, first_line(problem, 500))

    def _trial_runs(self, number: int) -> list:
        """Trial `number`'s own runs, newest first (one, unless its job and this module both
        created one)."""
        return self.store.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{STUDY} = '{self.study_name}' and tags.{TRIAL} = '{number}'",
            max_results=5,
            order_by=["attributes.start_time DESC"],
        )

    def finish(self, study, status: str) -> None:
        """The study's counts and its best trial, then the run's end with `status`."""
        trials = study.get_trials(deepcopy=False)
        for name in ("COMPLETE", "PRUNED", "FAIL"):
            count = sum(t.state.name == name for t in trials)
            self.store.log_metrics(self.run_id, {f"study_{name.lower()}": float(count)}, step=0)
        best = best_trial(study)
        if best is not None:
            for i, value in enumerate(best.values):
                self.store.log_metrics(self.run_id, {"best_value" if i == 0 else f"best_value_{i}": value}, step=0)
            self.store.set_tags(self.run_id, {BEST_TRIAL: str(best.number)})
            self.store.set_tags(
                self.run_id, {mlflow_key(f"best_params.{key}"): str(value) for key, value in best.params.items()}
            )
        self.store.end(self.run_id, status)

    def fail(self, error: str) -> None:
        """End the run FAILED with `error`, when the sweep stops before its study ends and the
        study's counts cannot be read (its storage was lost). Never raises: the caller is
        reporting an error already."""
        try:
            self.store.set_tags(self.run_id, {ERROR: error[:5000]})
            self.store.end(self.run_id, "FAILED")
        except Exception as problem:
            log.warning("could not end the sweep's MLflow run %s: %s", self.run_id, first_line(problem, 500))


def mlflow_key(text: str) -> str:
    """An MLflow param/tag key: config groups' `@` is not allowed there."""
    return re.sub(r"[^\w\-. /]", "_", text)
