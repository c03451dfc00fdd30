"""The sweep's MLflow run, parent of its trials' runs.

Its settings are params, the base config and the sweeper's config artifacts; each trial's end is a
point of its progress metrics; the best trial is a metric and tags at the end. The trials create
their own runs and tag themselves as its children (soda/train.py, tracking.trial_tags); this
module closes a trial's run when the trial's job could not (it died, or was interrupted), and
creates one for a trial that failed before its run started, so that every trial has one.
"""

import logging
import re
from typing import Any

from hydra_plugins.soda_sweeper.study import best_trial
from soda import tracking
from soda.errors import first_line

log = logging.getLogger(__name__)

PARENT_ATTR = "soda_mlflow_parent"  # study user attribute: the sweep's MLflow run id
RESUMED = tracking.RESUMED
BEST_TRIAL = "best_trial"


class ParentRun:
    def __init__(self, client, experiment_id: str, study_name: str, run_id: str):
        self.client = client  # an mlflow.MlflowClient
        self.experiment_id = experiment_id
        self.study_name = study_name
        self.run_id = run_id

    @classmethod
    def open(
        cls,
        uri: str,
        experiment: str,
        artifact_location: str | None,
        study,
        params: dict[str, str],
        artifacts: dict[str, str],
    ) -> "ParentRun":
        """The run recorded in the study (a resumed sweep), or a new one with `params` and
        `artifacts` (file name -> text). Fails, before any job starts, if the store is unusable."""
        import mlflow

        tracking.check_reachable(uri)
        client = mlflow.MlflowClient(uri)
        experiment_id = tracking.get_or_create_experiment(client, experiment, artifact_location)
        run = _existing_run(client, study.user_attrs.get(PARENT_ATTR))
        if run is not None:
            client.update_run(run.info.run_id, status="RUNNING")
            client.set_tag(run.info.run_id, RESUMED, "true")
            return cls(client, experiment_id, study.study_name, run.info.run_id)

        tags = {**tracking.parent_tags(study.study_name), **tracking.git_state()}
        run = client.create_run(experiment_id, run_name=study.study_name, tags=tags)
        run_id = run.info.run_id
        for key, value in params.items():
            client.log_param(run_id, mlflow_key(key), value[:6000])
        for name, text in artifacts.items():
            client.log_text(run_id, text, name)
        study.set_user_attr(PARENT_ATTR, run_id)
        return cls(client, experiment_id, study.study_name, run_id)

    def trial_ended(self, number: int, state: str, values: list[float] | None) -> None:
        """Count the trial's end (and its objective) as progress, at step = trial number."""
        metrics = {f"trials_{state.lower()}": 1.0}
        if values:
            metrics.update({f"trial_value_{i}" if i else "trial_value": v for i, v in enumerate(values)})
        try:
            for key, value in metrics.items():
                self.client.log_metric(self.run_id, key, value, step=number)
        except Exception as error:  # the sweep goes on; the trial's own run holds its record
            log.warning("could not record trial %d in the parent MLflow run: %s", number, first_line(error, 500))

    def close_child(self, number: int, status: str, error: str, params: dict[str, Any] | None = None) -> None:
        """Mark the trial's own run ended (a job that died could not do it itself); a trial that
        failed before its run started gets a run here, so that every trial has one."""
        try:
            runs = self.client.search_runs(
                [self.experiment_id],
                filter_string=(f"tags.{tracking.STUDY} = '{self.study_name}' and tags.{tracking.TRIAL} = '{number}'"),
                max_results=5,
            )
            if not runs:
                run = self.client.create_run(
                    self.experiment_id,
                    run_name=f"{self.study_name}-trial-{number}",
                    tags=tracking.trial_tags(self.study_name, number, self.run_id),
                )
                for key, value in (params or {}).items():
                    self.client.log_param(run.info.run_id, mlflow_key(key), str(value))
                runs = [run]
            for run in runs:
                trial_state = "FAIL" if status == "FAILED" else status
                self.client.set_tag(run.info.run_id, tracking.TRIAL_STATE, trial_state)
                if run.info.status == "RUNNING":
                    self.client.set_tag(run.info.run_id, tracking.ERROR, error[:5000])
                    self.client.set_terminated(run.info.run_id, status=status)
        except Exception as problem:
            log.warning("could not close the MLflow run of trial %d: %s", number, first_line(problem, 500))

    def finish(self, study, status: str) -> None:
        """The study's counts and its best trial, then the run's end with `status`."""
        trials = study.get_trials(deepcopy=False)
        for name in ("COMPLETE", "PRUNED", "FAIL"):
            count = sum(t.state.name == name for t in trials)
            self.client.log_metric(self.run_id, f"study_{name.lower()}", float(count))
        best = best_trial(study)
        if best is not None:
            for i, value in enumerate(best.values):
                self.client.log_metric(self.run_id, "best_value" if i == 0 else f"best_value_{i}", value)
            self.client.set_tag(self.run_id, BEST_TRIAL, str(best.number))
            for key, value in best.params.items():
                self.client.set_tag(self.run_id, mlflow_key(f"best_params.{key}"), str(value))
        self.client.set_terminated(self.run_id, status=status)


def _existing_run(client, run_id: str | None):
    """The run `run_id`, or None when there is none (a new study, or a deleted run)."""
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception:
        return None


def mlflow_key(text: str) -> str:
    """An MLflow param/tag key: config groups' `@` is not allowed there."""
    return re.sub(r"[^\w\-. /]", "_", text)
