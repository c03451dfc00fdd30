"""Crowd: 16 concurrent trials (a sweep, 4 in flight on the local launcher) writing to the
embedded SQLite store, and to an MLflow server on PostgreSQL (`make postgres-up`). Every trial
must finish, the store must hold every metric point each run says it sent, and no process may
meet a lock error."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from soda.record import LINEAR_ACC, POINTS_LOGGED
from tests.support.services import mlflow_server, needs_postgres
from tests.system.campaign import REPO, TINY, Store, environment, launch_command

TRIALS = 16
IN_FLIGHT = 4
EXPERIMENT = "faults-crowd"
SWEEP = f"""# @package _global_
defaults:
  - override /hydra/sweeper: soda_optuna
objective: {LINEAR_ACC}
sweep:
  study_name: faults_crowd
hydra:
  sweeper:
    direction: maximize
    sampler:
      name: grid
    params:
      seed: range(0, {TRIALS})
"""
LOCK_ERRORS = ("database is locked", "could not serialize", "deadlock detected", "OperationalError", "Lock wait")


def crowd(work: Path, name: str, uri: str, extra: list[str], record) -> None:
    """The sweep against the store at `uri` (`extra`: its other overrides); asserts that nothing
    was lost or locked out."""
    search = work / "conf"
    (search / "sweep").mkdir(parents=True, exist_ok=True)
    (search / "sweep" / "faults_crowd.yaml").write_text(SWEEP)
    command = launch_command(
        "-m",
        f"hydra.searchpath=[file://{search}]",
        "sweep=faults_crowd",
        *TINY,
        "dataset.train_size=128",
        "schedule.epochs=1",
        f"sweep.n_jobs={IN_FLIGHT}",
        f"sweep.study_name=crowd_{name}",
        f"sweep.storage={work}/optuna-{name}.log",
        f"tracking.uri={uri}",
        f"tracking.experiment={EXPERIMENT}",
        *extra,
        f"hydra.sweep.dir={work}/sweep-{name}",
    )
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=environment(work), capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, f"the sweep exited {result.returncode}:\n{result.stderr[-3000:]}"

    store = Store(uri, EXPERIMENT)
    trials = store.trials()
    finished = sum(trial.info.status == "FINISHED" for trial in trials)
    written = sum(int(trial.data.tags.get(POINTS_LOGGED, "-1")) for trial in trials)
    read = sum(store.points(trial) for trial in trials)
    logs = result.stderr + "".join(path.read_text(errors="replace") for path in (work / f"sweep-{name}").rglob("*.err"))
    locks = sum(logs.count(pattern) for pattern in LOCK_ERRORS)
    record.facts.append(
        f"{name} {finished}/{TRIALS} finished, {written} points written / {read} read, {locks} lock errors, "
        f"{seconds:.0f} s"
    )
    assert finished == TRIALS, f"{finished} of {TRIALS} trials finished"
    assert written == read and written > 0, f"{written} metric points written, {read} read back"
    assert locks == 0, f"{locks} lock errors in the logs"


@pytest.mark.slow
def test_a_crowd_of_trials_loses_nothing_in_the_embedded_store(work, record):
    crowd(work, "embedded", f"sqlite:///{work}/mlflow.db", [f"tracking.artifact_location={work}/artifacts"], record)


@needs_postgres
@pytest.mark.postgres
@pytest.mark.slow
def test_a_crowd_of_trials_loses_nothing_on_an_mlflow_server_on_postgresql(work, record):
    with mlflow_server(work, workers=4) as uri:
        crowd(work, "postgres", uri, ["tracking=server"], record)
