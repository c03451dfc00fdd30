"""The sweeper's pieces without jobs: what a (resumed) sweep plans to run, how a trial's end is
told to Optuna and MLflow, how interrupted trials are recovered, and the composition check."""

from __future__ import annotations

import logging
import signal
import threading
from functools import partial

import mlflow
import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from optuna.trial import TrialState

from launching import submission
from launching.sweeper.parent_run import END_ATTR, ParentRun
from launching.sweeper.scheduler import Scheduler
from launching.sweeper.search_space import check_every_value, grid_cells, parse_space
from launching.sweeper.trials import ERROR_ATTR, TRACKING_LOST, SweepState, plan, recover, summary
from soda.errors import TrackingLost
from soda.record import (
    ERROR,
    LINEAR_ACC,
    PARENT_RUN,
    PREVIOUS_END,
    STUDY,
    SWEEP,
    SWEEP_PARENT,
    TRIAL,
    TRIAL_STATE,
    trial_tags,
)
from soda.sweep import SweepError

optuna.logging.set_verbosity(optuna.logging.WARNING)


class FakeParent:
    """Records what the scheduler tells the sweep's MLflow run; `results`: how trials' own runs
    ended, as ParentRun.trial_result reads them ({number: ("COMPLETE", values) or ("PRUNED", None)})."""

    run_id = "parent-run"

    def __init__(self, results=None, trial_errors=None):
        self.results = dict(results or {})
        self.trial_errors = dict(trial_errors or {})  # {number: the error its own run ended with}
        self.closed: list[tuple[int, str]] = []
        self.errors: dict[int, str] = {}  # {number: the error close_child gave its run}
        self.ended: list[tuple[int, str]] = []
        self.finished: str | None = None

    def trial_result(self, number):
        return self.results.get(number)

    def trial_error(self, number):
        return self.trial_errors.get(number)

    def close_child(self, number, status, error, params=None):
        self.closed.append((number, status))
        self.errors[number] = error

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


def test_recovery_keeps_trials_whose_runs_ended_complete_or_pruned():
    # A sweeper SIGKILLed after its jobs ended but before it told Optuna: the trials' own runs
    # say how they ended; only the trial without an ended run runs again.
    storage = optuna.storages.InMemoryStorage()
    study = _study(storage)
    for _ in range(3):
        study.ask({"a": optuna.distributions.IntDistribution(0, 9)})
    parent = FakeParent(results={0: ("COMPLETE", [0.6]), 1: ("PRUNED", None)})

    recover(study, storage, parent)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "FAIL"]
    assert study.trials[0].value == 0.6 and ERROR_ATTR not in study.trials[0].user_attrs
    assert study.trials[2].user_attrs[ERROR_ATTR].startswith("interrupted")
    assert parent.closed == [(2, "KILLED")]  # the ended runs are left as they are
    assert parent.ended == [(0, "COMPLETE"), (1, "PRUNED")]
    target, done, queue = plan(study.trials, ["a"], None, n_trials=3)
    assert (target, done) == (3, 2)


# ---------------------------------------------------------------------------------------------
# Running: how each end of a trial is recorded


def _scheduler(
    outcomes: dict[int, object], n_jobs: int = 1, allowed_failures: int = 10, directions=("maximize",), parent=None
):
    """A scheduler of a grid over a = 0..len(outcomes)-1 whose trial for `a` ends with outcomes[a]:
    a JobReturn, an exception that the launch raises (a dead job), or a function that the launch
    calls (a job that takes its time). Returns (run it, study, parent, state, launched)."""
    dimensions, fixed = parse_space({"a": f"range(0, {len(outcomes)})"}, ["seed=7"])
    study = _study(directions=directions)
    parent = parent if parent is not None else FakeParent()
    launched: list[list[str]] = []

    def launch(overrides, number):
        launched.append(overrides)
        outcome = outcomes[int(overrides[1].split("=")[1])]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome() if callable(outcome) else outcome

    state = SweepState(target=len(outcomes), done=0, allowed_failures=allowed_failures)
    scheduler = Scheduler(study, parent, launch, dimensions, fixed, "/tmp/journal.log", n_jobs)
    return lambda: scheduler.run(grid_cells(dimensions), grid=True, state=state), study, parent, state, launched


def _schedule(outcomes: dict[int, object], n_jobs: int = 1, allowed_failures: int = 10, directions=("maximize",)):
    run, study, parent, state, launched = _scheduler(outcomes, n_jobs, allowed_failures, directions)
    run()
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
    # Each trial's command line: the fixed overrides, its parameter, its run's name, and where to report.
    first = next(o for o in launched if o[1] == "a=0")
    assert first == [
        "seed=7",
        "a=0",
        f"tracking.run_name='s #{numbers[0]}: a=0'",
        "sweep.study_name=s",
        "sweep.storage='/tmp/journal.log'",  # quoted: a bare / is not override syntax
        f"sweep.trial={numbers[0]}",
        "sweep.parent_run_id=parent-run",
    ]


def _store_lost(uri: str) -> JobReturn:
    return _raised(
        TrackingLost(f"MLflow tracking store {uri} stopped answering for 120 s (tracking.timeout_s; last: refused)")
    )


def test_a_trial_that_lost_the_tracking_store_stops_the_sweep_while_the_store_is_gone(tmp_path):
    gone = "http://127.0.0.1:9"  # the discard port: nothing answers
    parent = FakeParent()
    parent.uri = gone
    run, study, parent, state, launched = _scheduler(
        {0: _returned(0.5), 1: _store_lost(gone), 2: _returned(0.7)}, parent=parent
    )
    with pytest.raises(TrackingLost) as lost:
        run()
    message = str(lost.value)
    assert "trial 1 lost the MLflow tracking store" in message and "re-run the same command" in message
    assert "\n" not in message
    # Trial 2 never ran; trial 1 is not told to Optuna (MLflow cannot be told either): the run
    # that continues the sweep records it, with the reason the study keeps.
    assert len(launched) == 2 and [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]
    assert study.user_attrs[END_ATTR] == TRACKING_LOST and parent.closed == []

    storage = study._storage
    recover(study, storage, parent)
    assert study.trials[1].state.name == "FAIL" and study.trials[1].user_attrs[ERROR_ATTR] == TRACKING_LOST
    assert parent.errors == {1: TRACKING_LOST} and study.user_attrs[END_ATTR] == ""


def test_a_trial_that_lost_a_store_which_answers_again_is_an_ordinary_failure(tmp_path):
    parent = FakeParent()
    parent.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # answers
    run, study, parent, state, launched = _scheduler(
        {0: _store_lost("http://elsewhere:5000"), 1: _returned(0.7)}, parent=parent
    )
    run()
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"] and END_ATTR not in study.user_attrs


def test_a_multi_objective_trial_must_return_one_number_per_objective():
    outcomes = {0: _returned([0.5, 0.1]), 1: _returned(0.5)}
    study, _, _, _ = _schedule(outcomes, directions=("maximize", "minimize"))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    assert study.trials[0].values == [0.5, 0.1]
    assert study.trials[1].user_attrs[ERROR_ATTR] == "objective is 0.5, not 2 finite number(s)"


def test_a_job_that_died_after_its_run_finished_is_a_complete_trial():
    # The job's process died after its run had ended FINISHED (while handing back its result):
    # the trial's value is the one its run recorded, and it is not run again.
    parent = FakeParent(results={0: ("COMPLETE", [0.9])})
    run, study, parent, state, _ = _scheduler({0: RuntimeError("job 7 died"), 1: _returned(0.2)}, parent=parent)
    run()
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert study.trials[0].value == 0.9
    assert (state.done, state.failures, parent.closed) == (2, 0, [])


class CtrlC:
    """A Ctrl-C while a sweep's jobs run: `press` sends SIGINT to the main thread, as a terminal
    does; `stopped_job` is a job that runs until the sweeper cancels it (the launchers' registry,
    replaced here, returns `job_ids`: {trial number: job id}) and then leaves no result."""

    def __init__(self, monkeypatch, job_ids: dict[int, str]):
        self.cancelled = threading.Event()
        self.job_ids = job_ids
        monkeypatch.setattr(submission, "cancel_in_flight", self._cancel_all)

    def _cancel_all(self):
        self.cancelled.set()
        return dict(self.job_ids)

    @staticmethod
    def press():
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def stopped_job(self):
        assert self.cancelled.wait(timeout=30), "the sweeper did not cancel its jobs"
        raise RuntimeError("Job 4242 has not produced any output (state: INTERRUPTED)")


def test_ctrl_c_keeps_a_trial_whose_job_returned_and_stops_the_others(monkeypatch, caplog):
    ctrl_c = CtrlC(monkeypatch, {1: "4242", 2: "4243"})
    others_started = threading.Barrier(3, timeout=30)

    def first():  # ends just as Ctrl-C arrives, while the sweeper reads its result
        others_started.wait()
        ctrl_c.press()
        return _returned(0.75)

    def second():
        others_started.wait()
        ctrl_c.stopped_job()

    def third():  # stopped inside a checkpoint's write: its job hands back another error
        others_started.wait()
        assert ctrl_c.cancelled.wait(timeout=30)
        return _raised(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 81292608"))

    outcomes = {0: first, 1: second, 2: third, 3: _returned(0.5)}
    run, study, parent, state, launched = _scheduler(outcomes, n_jobs=3)
    with caplog.at_level(logging.INFO), pytest.raises(SweepError) as raised:
        run()
    assert str(raised.value) == (
        "sweep s interrupted: 1 of 4 trials finished, 2 stopped; re-run the same command to resume"
    )
    assert [(t.params["a"], t.state.name) for t in study.trials] == [(0, "COMPLETE"), (1, "FAIL"), (2, "FAIL")]
    assert study.trials[0].value == 0.75 and len(launched) == 3  # nothing launched after Ctrl-C
    assert all(t.user_attrs[ERROR_ATTR].startswith("interrupted") for t in study.trials[1:])
    assert parent.closed == [(1, "KILLED"), (2, "KILLED")] and parent.ended == [(0, "COMPLETE")]
    assert parent.finished == "KILLED" and (state.done, state.failures) == (1, 0)
    # One line per stopped job, saying what happens next.
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == [
        "trial 1 (job 4242): stopped; it will run again when you re-run the command",
        "trial 2 (job 4243): stopped; it will run again when you re-run the command",
    ]


def test_ctrl_c_keeps_trials_whose_runs_ended_complete_or_pruned(monkeypatch):
    # Ctrl-C reached the jobs too: each job's process stopped after its trial's run had ended, so no
    # result came back; the runs' records say how the trials ended.
    ctrl_c = CtrlC(monkeypatch, {0: "101", 1: "102"})
    both_started = threading.Barrier(2, timeout=30)

    def job(press: bool):
        def ends():
            both_started.wait()
            if press:
                ctrl_c.press()
            ctrl_c.stopped_job()

        return ends

    parent = FakeParent(results={0: ("COMPLETE", [0.6]), 1: ("PRUNED", None)})
    run, study, parent, state, _ = _scheduler({0: job(False), 1: job(True), 2: _returned(0.5)}, n_jobs=2, parent=parent)
    with pytest.raises(SweepError, match=r"^sweep s interrupted: 2 of 3 trials finished, 0 stopped;"):
        run()
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"]
    assert study.trials[0].value == 0.6
    assert parent.closed == [] and sorted(parent.ended) == [(0, "COMPLETE"), (1, "PRUNED")]
    assert (state.done, state.failures) == (2, 0)


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
    artifacts = {"sweep.yaml": "sampler: grid\n"}
    parent = ParentRun.open(uri, "sweeps", None, study, params, artifacts, objectives=[LINEAR_ACC])
    again = ParentRun.open(uri, "sweeps", None, study, {}, {}, objectives=[LINEAR_ACC])
    assert again.run_id == parent.run_id  # the study remembers its run

    client = mlflow.MlflowClient(uri)
    run = client.get_run(parent.run_id)
    assert run.data.tags[SWEEP] == SWEEP_PARENT and run.data.tags[STUDY] == "s"
    assert run.data.tags["resumed"] == "true"
    assert run.data.params == {"sweep.params.augmentation/view_augmentation.target": "choice(a, b)"}

    parent.close_child(4, "FAILED", "job died: out of memory", {"a": 1})
    children = client.search_runs([parent.experiment_id], filter_string=f"tags.{TRIAL} = '4'")
    assert len(children) == 1
    child = children[0]
    assert child.data.tags[PARENT_RUN] == parent.run_id
    assert child.data.tags[TRIAL_STATE] == "FAIL" and child.data.tags[ERROR].startswith("job died")
    assert child.info.status == "FAILED" and child.data.params == {"a": "1"}

    _finish(study, {"a": 2}, TrialState.COMPLETE, 0.9)
    parent.finish(study, status="FINISHED")
    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["best_value"] == 0.9 and run.data.metrics["study_complete"] == 1.0
    assert run.data.tags["best_trial"] == "0" and run.data.tags["best_params.a"] == "2"


def test_a_sweep_that_lost_its_tracking_store_says_so_when_it_continues(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study = _study(optuna.storages.InMemoryStorage())
    parent = ParentRun.open(uri, "sweeps", None, study, {}, {}, objectives=[LINEAR_ACC])
    assert parent.uri == uri
    study.set_user_attr(END_ATTR, TRACKING_LOST)  # the sweeper's record when MLflow could not be told
    ParentRun.open(uri, "sweeps", None, study, {}, {}, objectives=[LINEAR_ACC])
    assert mlflow.MlflowClient(uri).get_run(parent.run_id).data.tags[PREVIOUS_END] == TRACKING_LOST


def test_closing_a_trial_never_changes_a_run_that_ended_and_its_result_is_read_back(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study = _study(optuna.storages.InMemoryStorage())
    parent = ParentRun.open(uri, "sweeps", None, study, {}, {}, objectives=[LINEAR_ACC])
    client = mlflow.MlflowClient(uri)

    def child(number: int, status: str, state: str | None, values=()) -> str:
        """Trial `number`'s own run, as soda.train leaves it."""
        tags = trial_tags("s", number, parent.run_id) | ({TRIAL_STATE: state} if state else {})
        run_id = client.create_run(parent.experiment_id, tags=tags).info.run_id
        for step, value in enumerate(values, start=1):
            client.log_metric(run_id, LINEAR_ACC, value, step=step)
        if status != "RUNNING":
            client.set_terminated(run_id, status=status)
        return run_id

    finished = child(0, "FINISHED", "COMPLETE", [0.4, 0.7])
    pruned = child(1, "KILLED", "PRUNED", [0.1])
    failed = child(2, "FAILED", None)  # the job raised and ended its run itself
    running = child(3, "RUNNING", None, [0.2])  # the job was killed before it could
    for number in range(4):
        parent.close_child(number, "KILLED", "interrupted: the sweep was stopped")

    def ended(run_id):
        run = client.get_run(run_id)
        return run.info.status, run.data.tags.get(TRIAL_STATE), run.data.tags.get(ERROR)

    assert ended(finished) == ("FINISHED", "COMPLETE", None)
    assert ended(pruned) == ("KILLED", "PRUNED", None)
    assert ended(failed) == ("FAILED", "FAIL", None)  # ended without saying how the trial ended: said now
    assert ended(running) == ("KILLED", "FAIL", "interrupted: the sweep was stopped")

    assert parent.trial_result(0) == ("COMPLETE", [0.7])  # the objective's last value
    assert parent.trial_result(1) == ("PRUNED", None)
    assert parent.trial_result(2) is None and parent.trial_result(3) is None
    assert parent.trial_result(9) is None  # no run at all


# ---------------------------------------------------------------------------------------------
# What the terminal shows: one line per trial's end, and the summary


def _returned_with_log(value, folder: str) -> JobReturn:
    """A job's return that carries its Hydra config, as a real job's does (its log file is there)."""
    from omegaconf import OmegaConf

    hydra_cfg = OmegaConf.create(
        {
            "hydra": {
                "runtime": {"output_dir": folder},
                "job": {"name": "launch"},
                "job_logging": {
                    "handlers": {"file": {"filename": "${hydra.runtime.output_dir}/${hydra.job.name}.log"}}
                },
            }
        }
    )
    if isinstance(value, Exception):
        return JobReturn(status=JobStatus.FAILED, _return_value=value, hydra_cfg=hydra_cfg)
    return JobReturn(status=JobStatus.COMPLETED, _return_value=value, hydra_cfg=hydra_cfg)


def test_each_trial_s_end_is_one_line_with_progress_outcome_and_log(caplog):
    outcomes = {
        0: _returned_with_log(0.75, "/runs/sweep/0"),
        1: _returned_with_log(optuna.TrialPruned("linear_acc 0.1 below the median at step 2"), "/runs/sweep/1"),
        2: _returned_with_log(ValueError("batch too large\nsecond line"), "/runs/sweep/2"),
        3: RuntimeError("job 123 failed: MemoryError; full log: /runs/sweep/.submitit/123/123_0_log.err"),
        4: _returned(0.5),  # no Hydra config came back: no log to name
    }
    with caplog.at_level(logging.INFO, logger="launching.sweeper.scheduler"):
        study, _, state, _ = _schedule(outcomes, n_jobs=1)
    ended = [r.getMessage() for r in caplog.records if " done: " in r.getMessage()]
    assert ended == [
        "trial 0 COMPLETE, 1/5 done: 0.75; log /runs/sweep/0/launch.log",
        "trial 1 PRUNED, 2/5 done: linear_acc 0.1 below the median at step 2; log /runs/sweep/1/launch.log",
        "trial 2 FAIL, 2/5 done: ValueError: batch too large; log /runs/sweep/2/launch.log",
        "trial 3 FAIL, 2/5 done: job died: job 123 failed: MemoryError; full log: /runs/sweep/.submitit/123/123_0_log.err",
        "trial 4 COMPLETE, 3/5 done: 0.5",
    ]
    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert failures == ended[2:4]  # a failure stands out in the log
    launched = [r.getMessage() for r in caplog.records if "launched" in r.getMessage()]
    assert launched[0] == "trial 0 launched: a=0"

    assert summary(study, state) == (
        "sweep s: 5 trials in the study (2 complete, 1 pruned, 2 failed); this run: 2 failed "
        "[#2: ValueError: batch too large; #3: job died: job 123 failed: MemoryError; full log: "
        "/runs/sweep/.submitit/123/123_0_log.err]; best trial #0: 0.75 with a=0"
    )


def test_the_summary_counts_every_state_and_names_the_best_of_several_objectives():
    study = _study(directions=("maximize", "minimize"))
    state = SweepState(target=2, done=0, allowed_failures=0)
    assert (
        summary(study, state) == "sweep s: 0 trials in the study (0 complete, 0 pruned, 0 failed); this run: 0 failed"
    )
    trial = study.ask({"a": optuna.distributions.IntDistribution(0, 9)})
    study.tell(trial, [0.5, 0.25])
    assert summary(study, state).endswith(f"; best trial #0: 0.5, 0.25 with a={trial.params['a']}")


# ---------------------------------------------------------------------------------------------
# A custom search space: parameters that exist only for some trials


def _optimizer_space(config, trial) -> None:
    """SGD has a momentum, Adam none: suggested only when the trial's optimizer is sgd."""
    if trial.params["optimizer"] == "sgd":
        trial.suggest_float("schedule.momentum", 0.5, 0.99)


def _custom_scheduler(extend, outcomes=None, sampler=None, fixed=("seed=7",), n_trials=4):
    """A TPE search over `optimizer` (adam | sgd) whose trials all return 0.5 unless `outcomes`
    says otherwise; `extend(trial)` is the custom search space. Returns (run, study, state, launched)."""
    dimensions, fixed = parse_space({"optimizer": "choice(adam, sgd)"}, list(fixed))
    study = optuna.create_study(
        study_name="s", direction="maximize", sampler=sampler or optuna.samplers.TPESampler(seed=0)
    )
    launched: dict[int, list[str]] = {}

    def launch(overrides, number):
        launched[number] = overrides
        return (outcomes or {}).get(number, _returned(0.5))

    state = SweepState(target=n_trials, done=0, allowed_failures=n_trials)
    scheduler = Scheduler(study, FakeParent(), launch, dimensions, fixed, "/tmp/journal.log", 1, extend=extend)
    return lambda queue=(): scheduler.run(list(queue), grid=False, state=state), study, state, launched


def test_a_custom_search_space_adds_a_parameter_only_to_the_trials_that_need_it():
    config = {"sweep": "the sweep's run config"}
    seen: list = []

    def extend(trial):
        seen.append(trial.number)
        _optimizer_space(config, trial)

    # Both optimizers first (as a resumed sweep's retries would be), then what TPE asks for.
    run, study, state, launched = _custom_scheduler(extend, n_trials=6)
    run([{"optimizer": "adam"}, {"optimizer": "sgd"}])
    assert seen == list(range(6)) and state.done == 6
    for trial in study.trials:
        overrides = launched[trial.number]
        params = [o for o in overrides if not o.startswith(("sweep.", "seed=", "tracking.run_name="))]
        assert f"tracking.run_name='s #{trial.number}: optimizer={trial.params['optimizer']}" in " ".join(overrides)
        if trial.params["optimizer"] == "sgd":
            momentum = trial.params["schedule.momentum"]
            assert 0.5 <= momentum <= 0.99
            assert params == ["optimizer=sgd", f"schedule.momentum={momentum!r}"]
        else:
            assert "schedule.momentum" not in trial.params and params == ["optimizer=adam"]
    assert {t.params["optimizer"] for t in study.trials} == {"adam", "sgd"}
    assert study.trials[1].distributions["schedule.momentum"] == optuna.distributions.FloatDistribution(0.5, 0.99)


def test_a_failed_trial_of_a_custom_space_runs_again_with_what_was_suggested_for_it():
    # Trial 1 (sgd) failed: the resumed sweep enqueues it with its momentum, and the custom space's
    # suggestion takes that value again.
    run, study, _, launched = _custom_scheduler(
        partial(_optimizer_space, {}), outcomes={1: _raised(ValueError("diverged"))}
    )
    run([{"optimizer": "adam"}, {"optimizer": "sgd"}])
    failed = study.trials[1]
    assert failed.state.name == "FAIL"
    target, done, queue = plan(study.trials, ["optimizer"], None, n_trials=6)
    assert (target, done) == (6, 4)
    assert queue == [{"optimizer": "sgd", "schedule.momentum": failed.params["schedule.momentum"]}]

    again, study_again, _, launched_again = _custom_scheduler(partial(_optimizer_space, {}), n_trials=1)
    again(queue)
    assert study_again.trials[0].params == failed.params
    assert launched_again[0][:3] == launched[1][:3]  # seed, optimizer, momentum: the same command line


def test_a_custom_space_that_raises_or_clashes_with_a_fixed_override_fails_its_trial_without_a_job(caplog):
    def broken(trial):
        raise KeyError("optimiser")

    run, study, state, launched = _custom_scheduler(broken, n_trials=2)
    with caplog.at_level(logging.WARNING):
        run()
    # Failures stop the sweep as any others do: here once more than 2 have failed.
    assert launched == {} and [t.state.name for t in study.trials] == ["FAIL"] * 3
    assert study.trials[0].user_attrs[ERROR_ATTR] == "custom search space: KeyError: 'optimiser'"
    assert state.failures == 3 and caplog.records[0].getMessage().startswith(
        "trial 0 FAIL, 0/2 done: custom search space: KeyError"
    )

    def seed_too(trial):
        trial.suggest_int("seed", 0, 3)

    run, study, _, launched = _custom_scheduler(seed_too, n_trials=1)
    run()
    assert launched == {}
    assert study.trials[0].user_attrs[ERROR_ATTR] == "custom search space suggested seed, which the command line fixes"
