"""A store that stops answering mid-run, and a run directory whose record is gone
(soda.tracking.Tracker), on a real embedded store with the failures injected into MLflow's calls.
The same with a real server killed mid-run: tests/system/test_tracking_outage.py."""

from __future__ import annotations

import json
import time

import mlflow
import pytest
import requests
from mlflow.exceptions import MlflowException, RestException

from soda import tracking
from soda.errors import TrackingError, TrackingLost
from soda.record import LOST_RECORD, PREVIOUS_END, RECORD_STARTS_AT, RESUMED
from soda.store import unanswered


def _tracker(tmp_path, store: str = "mlflow.db", **options) -> tracking.Tracker:
    return tracking.Tracker(
        f"sqlite:///{tmp_path / store}",
        "faults",
        artifact_location=str(tmp_path / "artifacts"),
        system_metrics=False,
        **options,
    )


def _run(tracker: tracking.Tracker, run_id: str):
    """The run as its store holds it, read with a client of the test's own."""
    return mlflow.MlflowClient(tracker.uri).get_run(run_id)


def _start(tracker: tracking.Tracker, run_dir, epoch: int = 0) -> str:
    run_dir.mkdir(exist_ok=True)
    return tracker.start(run_dir, {"seed": "0"}, "seed: 0\n", {}, epoch=epoch)


@pytest.mark.parametrize(
    "error, answered",
    [
        (ConnectionError("refused"), False),
        (requests.exceptions.ConnectionError("Max retries exceeded"), False),
        (MlflowException("API request to http://h:5000/api/2.0/mlflow/runs/log-batch failed with exception x"), False),
        (MlflowException("API request to endpoint /runs/log-batch failed with error code 503 != 200"), False),
        (MlflowException("(psycopg2.OperationalError) connection to server failed"), False),
        (MlflowException("API request to endpoint /runs/log-batch failed with error code 400 != 200"), True),
        (RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad metric"}), True),
        (ValueError("a bug"), True),
    ],
)
def test_only_a_store_that_does_not_answer_is_retried(error, answered):
    assert unanswered(error) is not answered


def test_a_store_that_stops_answering_ends_the_run_after_the_timeout(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    tracker = _tracker(tmp_path, timeout_s=1.5)
    run_id = _start(tracker, run_dir)
    tracker.log_metrics({"train/loss": 1.0}, step=1)

    def refused(*args, **kwargs):
        raise MlflowException("API request to http://127.0.0.1:1/api failed with exception Connection refused")

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", refused)
    started = time.monotonic()
    with pytest.raises(TrackingLost) as lost:
        tracker.log_metrics({"train/loss": 0.5}, step=2)
    waited = time.monotonic() - started
    assert 1.5 <= waited < 5, waited
    message = str(lost.value)
    assert "\n" not in message and "stopped answering for 1.5 s" in message and run_id in message
    with pytest.raises(TrackingLost):  # no second wait: the run is over
        tracker.log_metrics({"train/loss": 0.4}, step=3)
    assert time.monotonic() - started < waited + 1

    # The store is still gone as the run ends: the run directory says how the process ended,
    # and the next start records it and continues.
    monkeypatch.setattr(mlflow.MlflowClient, "set_tag", refused)
    monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", refused)
    tracker.abandon(run_dir, "at epoch 1 + 2 steps")
    assert json.loads((run_dir / tracking.END_FILE).read_text())["run_id"] == run_id
    ending = time.monotonic()
    tracker.finish("failed", error="late")  # the run is over for this process: no wait, no write
    assert time.monotonic() - ending < 0.5
    monkeypatch.undo()
    assert _run(tracker, run_id).info.status == "RUNNING"
    again = _tracker(tmp_path)
    assert _start(again, run_dir) == run_id and again.resumed
    tags = _run(again, run_id).data.tags
    assert tags[PREVIOUS_END].startswith("tracking_lost: MLflow tracking store sqlite:///")
    assert tags[PREVIOUS_END].endswith("at epoch 1 + 2 steps")
    assert not (run_dir / tracking.END_FILE).exists()
    again.finish("finished")


def test_a_store_that_answers_again_within_the_timeout_loses_nothing(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    tracker = _tracker(tmp_path, timeout_s=30)
    run_id = _start(tracker, run_dir)
    real, calls = mlflow.MlflowClient.log_batch, []

    def flaky(client, *args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise requests.exceptions.ConnectionError("Connection refused")
        return real(client, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", flaky)
    tracker.log_metrics({"train/loss": 0.5}, step=2)
    tracker.finish("finished")
    assert len(calls) == 3
    history = mlflow.MlflowClient(tracker.uri).get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(2, 0.5)]
    assert _run(tracker, run_id).info.status == "FINISHED"


def test_a_store_that_refuses_a_write_fails_at_once(tmp_path, monkeypatch):
    tracker = _tracker(tmp_path, timeout_s=60)
    _start(tracker, tmp_path / "run")

    def refused(*args, **kwargs):
        raise RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad metric"})

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", refused)
    started = time.monotonic()
    with pytest.raises(RestException):
        tracker.log_metrics({"train/loss": 0.5}, step=2)
    assert time.monotonic() - started < 1
    tracker.finish("failed", error="refused")


def test_a_run_directory_whose_record_is_gone_is_not_silently_given_a_new_one(tmp_path):
    run_dir = tmp_path / "run"
    first = _tracker(tmp_path, "first.db")
    lost = _start(first, run_dir)
    first.finish("preempted", error="preempted")

    # Another (or a recreated) store: the run is not in it.
    with pytest.raises(TrackingError) as refused:
        _start(_tracker(tmp_path, "second.db"), run_dir, epoch=3)
    message = str(refused.value)
    assert "\n" not in message and lost in message and "tracking.resume_without_record=true" in message
    assert (run_dir / tracking.RUN_ID_FILE).read_text().strip() == lost  # untouched
    other = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'second.db'}")
    assert other.search_runs([other.get_experiment_by_name("faults").experiment_id]) == []  # nothing written

    # Asked for: a new run that says what it continues and where its record starts.
    second = _tracker(tmp_path, "second.db", resume_without_record=True)
    new = _start(second, run_dir, epoch=3)
    assert new != lost and second.resumed
    tags = _run(second, new).data.tags
    assert tags[LOST_RECORD].startswith(lost) and tags[RECORD_STARTS_AT] == "3"
    assert tags[RESUMED] == "true" and lost in tags[PREVIOUS_END]
    assert (run_dir / tracking.RUN_ID_FILE).read_text().strip() == new
    second.finish("finished")


def test_a_live_run_writes_through_its_own_client_and_leaves_mlflows_globals_alone(tmp_path):
    """Two trackers on two stores, live at once in one process (MLflow's active run would refuse
    the second): each run is in its own store, with the context tags mlflow.start_run gives, and
    the process-wide tracking URI is untouched."""
    before = mlflow.get_tracking_uri()
    first, second = _tracker(tmp_path, "first.db", run_name="one"), _tracker(tmp_path, "second.db")
    one, two = _start(first, tmp_path / "one"), _start(second, tmp_path / "two")
    first.log_metrics({"train/loss": 1.0}, step=1)
    second.log_metrics({"train/loss": 2.0}, step=1)
    first.finish("finished")
    second.finish("failed", error="on purpose")
    assert mlflow.get_tracking_uri() == before
    assert (_run(first, one).info.status, _run(second, two).info.status) == ("FINISHED", "FAILED")
    assert _run(first, one).data.metrics == {"train/loss": 1.0}
    assert _run(second, two).data.metrics == {"train/loss": 2.0}
    tags = _run(first, one).data.tags
    assert tags["mlflow.runName"] == "one" and "mlflow.source.name" in tags and "mlflow.user" in tags
    assert _run(first, one).data.params == {"seed": "0"}
    with pytest.raises(MlflowException):  # each run only where its tracker writes
        mlflow.MlflowClient(second.uri).get_run(one)
