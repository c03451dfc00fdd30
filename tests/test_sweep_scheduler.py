"""The sweeper's pieces without jobs: what a (resumed) sweep plans to run, how a trial's end is
told to Optuna and MLflow, how interrupted trials are recovered, and the composition check."""

from __future__ import annotations

import mlflow
import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from optuna.trial import TrialState

from hydra_plugins.soda_sweeper.parent_run import ParentRun
from hydra_plugins.soda_sweeper.scheduler import ERROR_ATTR, Scheduler, SweepState, plan, recover
from hydra_plugins.soda_sweeper.search_space import check_every_value, grid_cells, parse_space
from soda import tracking
from soda.sweep import SweepError

optuna.logging.set_verbosity(optuna.logging.WARNING)


class FakeParent:
    """Records what the scheduler tells the sweep's MLflow run."""

    run_id = "parent-run"

    def __init__(self):
        self.closed: list[tuple[int, str]] = []
        self.ended: list[tuple[int, str]] = []
        self.finished: str | None = None

    def close_child(self, number, status, error, params=None):
        self.closed.append((number, status))

    def trial_ended(self, number, state, values):
        self.ended.append((number, state))

    def finish(self, study, status):
        self.finished = status


def _study(storage=None, directions=("maximize",)):
    return optuna.create_study(study_name="s", storage=storage, directions=list(directions))


def _finish(study, params: dict, state: TrialState, value: float | None = None) -> None:
    study.enqueue_trial(params)
    trial = study.ask({name: optuna.distributions.IntDistribution(0, 9) for name in params})
    study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)


# ---------------------------------------------------------------------------------------------
# Planning


def test_a_resumed_grid_runs_only_its_unfinished_cells_up_to_n_trials():
    dimensions, _ = parse_space({"a": "range(0, 2)", "b": "range(0, 2)"}, [])
    cells = grid_cells(dimensions)
    assert cells == [{"a": 0, "b": 0}, {"a": 0, "b": 1}, {"a": 1, "b": 0}, {"a": 1, "b": 1}]
    study = _study()
    _finish(study, {"a": 0, "b": 1}, TrialState.COMPLETE, 0.5)
    _finish(study, {"a": 1, "b": 0}, TrialState.FAIL)  # failed: its cell runs again

    target, done, queue = plan(study.trials, ["a", "b"], cells, n_trials=None)
    assert (target, done) == (4, 1)
    assert queue == [{"a": 0, "b": 0}, {"a": 1, "b": 0}, {"a": 1, "b": 1}]
    target, done, queue = plan(study.trials, ["a", "b"], cells, n_trials=2)
    assert (target, done, queue) == (2, 1, [{"a": 0, "b": 0}])


def test_a_resumed_search_retries_each_failed_point_once_unless_it_later_succeeded():
    study = _study()
    _finish(study, {"a": 1}, TrialState.FAIL)
    _finish(study, {"a": 1}, TrialState.FAIL)  # the same point twice: retried once
    _finish(study, {"a": 2}, TrialState.FAIL)
    _finish(study, {"a": 2}, TrialState.COMPLETE, 0.1)  # succeeded later: not retried
    target, done, queue = plan(study.trials, ["a"], None, n_trials=5)
    assert (target, done, queue) == (5, 1, [{"a": 1}])


def test_trials_a_killed_sweep_left_running_or_waiting_are_marked_interrupted():
    storage = optuna.storages.InMemoryStorage()
    study = _study(storage)
    _finish(study, {"a": 3}, TrialState.COMPLETE, 0.3)
    running = study.ask({"a": optuna.distributions.IntDistribution(0, 9)})
    study.enqueue_trial({"a": 5})  # waiting
    parent = FakeParent()

    recover(study, storage, parent)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    assert all(t.user_attrs[ERROR_ATTR].startswith("interrupted") for t in study.trials[1:])
    assert parent.closed == [(running.number, "KILLED"), (2, "KILLED")]


# ---------------------------------------------------------------------------------------------
# Running: how each end of a trial is recorded


def _schedule(outcomes: dict[int, object], n_jobs: int = 1, allowed_failures: int = 10, directions=("maximize",)):
    """A grid over a = 0..len(outcomes)-1 whose trial for `a` ends with outcomes[a]: a JobReturn,
    or an exception that the launch raises (a dead job)."""
    dimensions, fixed = parse_space({"a": f"range(0, {len(outcomes)})"}, ["seed=7"])
    study = _study(directions=directions)
    parent = FakeParent()
    launched: list[list[str]] = []

    def launch(overrides, number):
        launched.append(overrides)
        outcome = outcomes[int(overrides[1].split("=")[1])]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    state = SweepState(target=len(outcomes), done=0, allowed_failures=allowed_failures)
    scheduler = Scheduler(study, parent, launch, dimensions, fixed, "/tmp/journal.log", n_jobs)
    scheduler.run(grid_cells(dimensions), grid=True, state=state)
    return study, parent, state, launched


def _returned(value) -> JobReturn:
    return JobReturn(status=JobStatus.COMPLETED, _return_value=value)


def _raised(error: Exception) -> JobReturn:
    return JobReturn(status=JobStatus.FAILED, _return_value=error)


def test_each_way_a_trial_ends_is_told_to_optuna_and_the_parent_run():
    outcomes = {
        0: _returned(0.75),
        1: _raised(optuna.TrialPruned("below threshold")),
        2: _raised(ValueError("batch too large")),
        3: RuntimeError("job 123 died: killed by signal 9"),
        4: _returned(float("nan")),
    }
    study, parent, state, launched = _schedule(outcomes, n_jobs=2)
    states = {t.params["a"]: t.state.name for t in study.trials}
    assert states == {0: "COMPLETE", 1: "PRUNED", 2: "FAIL", 3: "FAIL", 4: "FAIL"}
    assert study.best_value == 0.75
    errors = {t.params["a"]: t.user_attrs.get(ERROR_ATTR) for t in study.trials}
    assert errors[2] == "ValueError: batch too large"
    assert errors[3].startswith("job died: job 123 died")
    assert errors[4] == "objective is nan, not 1 finite number(s)"
    assert (state.done, state.failures, len(state.errors)) == (2, 3, 3)
    # Failed trials' runs are closed by the sweeper (their job could not); every end is progress.
    numbers = {t.params["a"]: t.number for t in study.trials}
    assert sorted(parent.closed) == sorted((numbers[a], "FAILED") for a in (2, 3, 4))
    assert sorted(state for _, state in parent.ended) == ["COMPLETE", "FAIL", "FAIL", "FAIL", "PRUNED"]
    # Each trial's command line: the fixed overrides, its parameter, and where to report.
    first = next(o for o in launched if o[1] == "a=0")
    assert first == [
        "seed=7",
        "a=0",
        "sweep.study_name=s",
        "sweep.storage='/tmp/journal.log'",  # quoted: a bare / is not override syntax
        f"sweep.trial={numbers[0]}",
        "sweep.parent_run_id=parent-run",
    ]


def test_a_multi_objective_trial_must_return_one_number_per_objective():
    outcomes = {0: _returned([0.5, 0.1]), 1: _returned(0.5)}
    study, _, _, _ = _schedule(outcomes, directions=("maximize", "minimize"))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    assert study.trials[0].values == [0.5, 0.1]
    assert study.trials[1].user_attrs[ERROR_ATTR] == "objective is 0.5, not 2 finite number(s)"


def test_the_sweep_stops_launching_once_more_trials_failed_than_allowed():
    outcomes = {a: _raised(ValueError("no")) for a in range(4)}
    study, _, state, launched = _schedule(outcomes, n_jobs=1, allowed_failures=1)
    assert len(launched) == 2 and state.failures == 2  # the second failure exceeds 1: stop
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]


# ---------------------------------------------------------------------------------------------
# The composition check and the parent run


def test_every_value_is_composed_once_and_a_bad_one_is_named():
    dimensions, fixed = parse_space({"a": "choice(x, y, z)", "b": "range(0, 3)", "lr": "interval(0.1, 1.0)"}, [])
    composed: list[list[str]] = []
    check_every_value(dimensions, fixed, composed.append)
    # The first value of each, then each other value (intervals: both ends) with the others first.
    assert composed[0] == ["a=x", "b=0", "lr=0.1"]
    assert len(composed) == 1 + 2 + 2 + 1
    assert ["a=x", "b=0", "lr=1.0"] in composed

    def compose(overrides):
        if "b=2" in overrides:
            raise ValueError("b=2 must be < 2\nmore detail")

    with pytest.raises(SweepError, match=r"^sweep trial with b=2 cannot be composed: b=2 must be < 2$"):
        check_every_value(dimensions, fixed, compose)


def test_the_parent_run_is_reused_on_resume_and_closes_a_trial_that_never_started(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study = _study(optuna.storages.InMemoryStorage())
    params = {"sweep.params.augmentation/view@augmentation.target": "choice(a, b)"}
    parent = ParentRun.open(uri, "sweeps", None, study, params, {"sweep.yaml": "sampler: grid\n"})
    again = ParentRun.open(uri, "sweeps", None, study, {}, {})
    assert again.run_id == parent.run_id  # the study remembers its run

    client = mlflow.MlflowClient(uri)
    run = client.get_run(parent.run_id)
    assert run.data.tags[tracking.SWEEP] == tracking.SWEEP_PARENT and run.data.tags[tracking.STUDY] == "s"
    assert run.data.tags["resumed"] == "true"
    assert run.data.params == {"sweep.params.augmentation/view_augmentation.target": "choice(a, b)"}

    parent.close_child(4, "FAILED", "job died: out of memory", {"a": 1})
    children = client.search_runs([parent.experiment_id], filter_string=f"tags.{tracking.TRIAL} = '4'")
    assert len(children) == 1
    child = children[0]
    assert child.data.tags[tracking.PARENT_RUN] == parent.run_id
    assert child.data.tags[tracking.TRIAL_STATE] == "FAIL" and child.data.tags[tracking.ERROR].startswith("job died")
    assert child.info.status == "FAILED" and child.data.params == {"a": "1"}

    _finish(study, {"a": 2}, TrialState.COMPLETE, 0.9)
    parent.finish(study, status="FINISHED")
    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["best_value"] == 0.9 and run.data.metrics["study_complete"] == 1.0
    assert run.data.tags["best_trial"] == "0" and run.data.tags["best_params.a"] == "2"
