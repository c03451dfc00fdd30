"""A run directory has one owner and one set of settings (soda/rundir.py), and every way a run's
process ends leaves its MLflow record saying so (soda.train.run, soda.ENDINGS)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from soda import rundir, store, train
from soda.errors import RunDirError
from soda.record import ENDED, ERROR, KNN_ACC, LOST, PREVIOUS_END, RESUME_CHANGES, RUN_DIR, TRAIN_LOSS
from tests.helpers import REPO, SMOKE, compose_config

# ------------------------------------------------------------------------------------------------
# The owner


def _lock(path: Path, **owner) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / rundir.LOCK_FILE).write_text(json.dumps(owner))


def test_a_second_claim_of_a_held_directory_names_the_owner(tmp_path):
    first = rundir.RunDirectory(tmp_path / "run")
    first.claim()
    try:
        # Another process's lock, as written: this process's pid, but not its token.
        with pytest.raises(RunDirError, match=rf"in use by pid {os.getpid()} on {socket.gethostname()}"):
            _claim_as_another_process(tmp_path / "run")
    finally:
        first.release()
    assert not (tmp_path / "run" / rundir.LOCK_FILE).exists()
    assert not list((tmp_path / "run").glob(".soda-lock.*")), "a temporary lock file was left"


def _claim_as_another_process(path: Path) -> None:
    """Claim from a child process (the lock's owner, this process, is alive)."""
    code = (
        "import sys; from soda.rundir import RunDirectory; from soda.errors import RunDirError\n"
        f"try:\n    RunDirectory({str(path)!r}).claim()\nexcept RunDirError as e:\n    print(e); sys.exit(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    if result.returncode == 3:
        raise RunDirError(result.stdout.strip())
    assert result.returncode == 0, result.stderr


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock(tmp_path, host=socket.gethostname(), pid=dead.pid, process_started=1.0, started="then")
    directory = rundir.RunDirectory(tmp_path)
    directory.claim()
    assert directory.previous_owner["pid"] == dead.pid
    assert json.loads((tmp_path / rundir.LOCK_FILE).read_text())["token"] == directory.token
    directory.release()


def test_a_live_process_with_a_reused_pid_does_not_hold_the_lock(tmp_path):
    """The pid is alive, but it is another process than the one that took the lock."""
    _lock(tmp_path, host=socket.gethostname(), pid=1, process_started=12345.0, started="then")
    directory = rundir.RunDirectory(tmp_path)
    directory.claim()
    directory.release()


def test_a_lock_of_another_host_is_stale_only_when_no_longer_refreshed(tmp_path, monkeypatch):
    _lock(tmp_path, host="elsewhere", pid=4242, started="then")
    with pytest.raises(RunDirError, match="in use by pid 4242 on elsewhere"):
        rundir.RunDirectory(tmp_path).claim()
    old = time.time() - rundir.STALE_AFTER_SECONDS - 60
    os.utime(tmp_path / rundir.LOCK_FILE, (old, old))
    directory = rundir.RunDirectory(tmp_path)
    directory.claim()
    directory.release()


def test_a_requeued_slurm_job_takes_over_its_own_earlier_lock(tmp_path, monkeypatch):
    _lock(tmp_path, host="node-17", pid=4242, slurm_job="981", started="then")
    monkeypatch.setenv("SLURM_JOB_ID", "982")
    with pytest.raises(RunDirError, match="SLURM job 981"):
        rundir.RunDirectory(tmp_path).claim()
    monkeypatch.setenv("SLURM_JOB_ID", "981")
    directory = rundir.RunDirectory(tmp_path)
    directory.claim()
    directory.release()


def test_the_owner_refreshes_its_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "HEARTBEAT_SECONDS", 0.05)
    directory = rundir.RunDirectory(tmp_path)
    directory.claim()
    old = time.time() - 3600
    os.utime(tmp_path / rundir.LOCK_FILE, (old, old))
    time.sleep(0.5)
    assert time.time() - (tmp_path / rundir.LOCK_FILE).stat().st_mtime < 60
    directory.release()


def test_an_unwritable_run_directory_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RunDirError, match=r"cannot write run directory .*hydra.run.dir"):
        rundir.RunDirectory(blocker / "run").claim()


# ------------------------------------------------------------------------------------------------
# The settings


def test_a_resumable_change_is_allowed_and_any_other_is_refused(tmp_path):
    directory = rundir.RunDirectory(tmp_path)
    started = {"schedule": {"epochs": 2, "decoder_lr": 0.001}, "augmentation": {"name": "seed"}}
    assert directory.check_settings(started) == {}  # a new directory
    directory.save_settings(started)
    assert directory.check_settings(started) == {}
    more = {"schedule": {"epochs": 4, "decoder_lr": 0.001}, "augmentation": {"name": "seed"}}
    assert directory.check_settings(more) == {"schedule.epochs": ("2", "4")}
    other = {"schedule": {"epochs": 4, "decoder_lr": 0.002}, "augmentation": {"name": "none"}}
    with pytest.raises(RunDirError) as refused:
        directory.check_settings(other)
    message = str(refused.value)
    assert "augmentation: seed -> none" in message and "schedule.decoder_lr: 0.001 -> 0.002" in message
    assert "schedule.epochs:" not in message.split("(only")[0]  # allowed: not listed as a difference
    assert "\n" not in message


def _runs(tmp_path: Path) -> list:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # A first query creates the store's tables; while a run may be doing so too, take turns on
    # the lock the runs take, or one of the two fails ("table metrics already exists").
    with store._one_creator(uri):
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name("soda")
        return client.search_runs([experiment.experiment_id]) if experiment else []


def test_rerunning_a_directory_with_other_settings_stops_before_any_work(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    train.run(compose_config([*SMOKE, "tracking.experiment=soda"], tmp_path), run_dir=run_dir)
    (before,) = _runs(tmp_path)
    checkpoint = (run_dir / train.CHECKPOINT).read_bytes()

    def no_data(settings):
        raise AssertionError("the refused run read its data")

    monkeypatch.setattr(train, "load_data", no_data)
    changed = [*SMOKE, "tracking.experiment=soda", "schedule.decoder_lr=0.002", "augmentation=none"]
    with pytest.raises(
        RunDirError, match=r"other settings \(augmentation: seed -> none, schedule.decoder_lr: 0.001 -> 0.002\)"
    ):
        train.run(compose_config(changed, tmp_path), run_dir=run_dir)
    (after,) = _runs(tmp_path)
    assert after.info.status == "FINISHED"
    assert (after.data.params, after.data.tags, after.data.metrics) == (
        before.data.params,
        before.data.tags,
        before.data.metrics,
    )
    assert (run_dir / train.CHECKPOINT).read_bytes() == checkpoint
    assert not (run_dir / rundir.LOCK_FILE).exists()


def test_more_epochs_on_resume_are_recorded_without_rewriting_the_params(tmp_path):
    run_dir = tmp_path / "run"
    train.run(compose_config([*SMOKE, "tracking.experiment=soda"], tmp_path), run_dir=run_dir)
    train.run(compose_config([*SMOKE, "tracking.experiment=soda", "schedule.epochs=2"], tmp_path), run_dir=run_dir)
    (run,) = _runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.params["schedule.epochs"] == "1"
    assert run.data.tags[RESUME_CHANGES].endswith("schedule.epochs: 1 -> 2")
    assert run.data.tags[PREVIOUS_END] == "finished" and ERROR not in run.data.tags
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert [m.step for m in client.get_metric_history(run.info.run_id, KNN_ACC)] == [1, 2]
    assert "epochs: 2" in (run_dir / rundir.CONFIG_FILE).read_text()


# ------------------------------------------------------------------------------------------------
# How a process ends: real processes, real signals.

SLOW = [
    *SMOKE,
    "tracking.experiment=soda",
    "schedule.epochs=200",
    "dataset.train_size=512",
    "eval.at_start=false",
    "eval.every=100",
]


def _start(tmp_path: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    args = [*SLOW, *extra, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "launch.py"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_training(tmp_path: Path, process: subprocess.Popen) -> None:
    """Until the run has logged a training loss."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        try:
            runs = _runs(tmp_path) if (tmp_path / "mlflow.db").exists() else []
        except Exception:  # the run is still creating the store's tables
            runs = []
        if runs and TRAIN_LOSS in runs[0].data.metrics:
            return
        time.sleep(1)
    process.kill()
    raise AssertionError(f"the run did not start training:\n{process.communicate()[1][-3000:]}")


@pytest.mark.heavy
@pytest.mark.parametrize(
    ("signum", "returncode", "ended"),
    [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
)
def test_a_stop_signal_leaves_the_run_killed_and_a_later_finish_claims_no_error(tmp_path, signum, returncode, ended):
    run_dir = tmp_path / "run"
    process = _start(tmp_path, run_dir)
    _wait_for_training(tmp_path, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == returncode, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith("stopped:")]
    assert f"hydra.run.dir={run_dir}" in line
    (run,) = _runs(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags[ENDED] == ended
    assert signal.Signals(signum).name in run.data.tags[ERROR]
    assert not (run_dir / rundir.LOCK_FILE).exists()

    # The same directory again, to its end (fewer epochs: an allowed change).
    finish = _start(tmp_path, run_dir, "schedule.epochs=1")
    _, stderr = finish.communicate(timeout=300)
    assert finish.returncode == 0, stderr[-3000:]
    (run,) = _runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags[ENDED] == "finished"
    assert ERROR not in run.data.tags
    assert run.data.tags[PREVIOUS_END].startswith(ended)


@pytest.mark.heavy
def test_a_sigkilled_run_is_found_lost_by_the_next_start(tmp_path):
    run_dir = tmp_path / "run"
    process = _start(tmp_path, run_dir)
    _wait_for_training(tmp_path, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert (run_dir / rundir.LOCK_FILE).exists()  # nothing could remove it
    (run,) = _runs(tmp_path)
    assert run.info.status == "RUNNING"

    finish = _start(tmp_path, run_dir, "schedule.epochs=1")
    _, stderr = finish.communicate(timeout=300)
    assert finish.returncode == 0, stderr[-3000:]
    (run,) = _runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags[PREVIOUS_END] == LOST


@pytest.mark.heavy
def test_a_second_launch_into_a_live_run_directory_stops_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    process = _start(tmp_path, run_dir)
    try:
        _wait_for_training(tmp_path, process)
        second = _start(tmp_path, run_dir)
        _, stderr = second.communicate(timeout=120)
        assert second.returncode != 0 and "Traceback" not in stderr, stderr[-3000:]
        (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert f"in use by pid {process.pid}" in line
        (run,) = _runs(tmp_path)
        assert run.info.status == "RUNNING"  # the owner's record is untouched
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.communicate(timeout=120)


@pytest.mark.heavy
def test_two_launches_in_the_same_second_get_their_own_directory_and_record(tmp_path):
    """The default run directory: two launches at once never share it (nor an MLflow run)."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    common = [*SMOKE, "tracking.experiment=soda", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    processes = [
        subprocess.Popen(
            [sys.executable, str(REPO / "launch.py"), *common, f"seed={seed}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    run_dirs = sorted(path.parent for path in (tmp_path / "outputs").glob(f"*/*/{rundir.CONFIG_FILE}"))
    assert len(run_dirs) == 2
    runs = _runs(tmp_path)
    assert len(runs) == 2 and {r.data.tags[RUN_DIR] for r in runs} == {str(d) for d in run_dirs}
    for run in runs:
        assert run.data.params["seed"] == run.data.tags["seed"]
    assert {run.data.params["seed"] for run in runs} == {"1", "2"}
