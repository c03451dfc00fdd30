"""`python -m soda.evaluate <run dir>`: a saved run's EMA model evaluated again, and recorded on
its MLflow run under its own keys."""

import os
import subprocess
import sys

import mlflow
import pytest

from soda import tracking
from soda.record import KNN_ACC, LATENT_GAP, LINEAR_ACC, RECON_MSE
from tests.helpers import REPO, SMOKE, launch


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """One launch.py run (its .hydra/config.yaml, checkpoint and MLflow run), shared by the tests."""
    work = tmp_path_factory.mktemp("saved")
    store = f"sqlite:///{work}/mlflow.db"
    result = launch(
        [
            "experiment=demo",
            *SMOKE,
            "eval.at_start=false",
            "eval.latent_gap_images=16",
            f"tracking.uri={store}",
            f"tracking.artifact_location={work}/artifacts",
            f"hydra.run.dir={work}/run",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run_id = (work / "run" / tracking.RUN_ID_FILE).read_text().strip()
    return work / "run", mlflow.MlflowClient(store), run_id


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "soda.evaluate", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def test_the_saved_model_reproduces_the_runs_final_metrics_and_records_them_apart(saved_run):
    run_dir, client, run_id = saved_run
    before = client.get_run(run_id).data.metrics
    result = _evaluate(str(run_dir))
    assert result.returncode == 0, result.stderr[-2000:]

    after = client.get_run(run_id)
    # The same EMA weights, data and seeded evaluation as training's last one: the same numbers.
    for key in (KNN_ACC, LINEAR_ACC, LATENT_GAP, RECON_MSE):
        name = key.split("/", 1)[1]
        assert after.data.metrics[f"posthoc/{name}"] == pytest.approx(before[key], abs=1e-6)
        assert f"{name} " in result.stdout or f"{key} " in result.stdout
        # The training-time points are untouched: still one point per evaluation.
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1]
    assert [m.step for m in client.get_metric_history(run_id, "posthoc/knn_acc")] == [1]
    assert after.data.tags["posthoc.overrides"] == "(none)" and after.info.status == "FINISHED"
    assert "own latent" in result.stdout  # the latent test per timestep, with the dropped latent

    again = _evaluate(str(run_dir))  # the same name at the same epoch: refused, nothing added
    assert again.returncode == 2 and "already has posthoc/" in again.stderr
    assert [m.step for m in client.get_metric_history(run_id, "posthoc/knn_acc")] == [1]


def test_eval_overrides_are_applied_and_recorded_under_another_name(saved_run):
    run_dir, client, run_id = saved_run
    result = _evaluate(str(run_dir), "eval=dino", "eval.knn_k=3", "eval.num_reconstructions=0", "--name", "dino3")
    assert result.returncode == 0, result.stderr[-2000:]
    run = client.get_run(run_id)
    assert "dino3/knn_acc" in run.data.metrics and "dino3/recon_mse" not in run.data.metrics
    assert run.data.tags["dino3.overrides"] == "eval=dino eval.knn_k=3 eval.num_reconstructions=0"


@pytest.mark.parametrize(
    "args, message",
    [
        (["model.latent_dim=3"], "only eval=<option>, eval.<key>=<value> and device=<name>"),
        (["eval.knn_k=0"], "eval.knn_k=0 must be positive"),
        (["eval.no_such_key=1"], "no_such_key"),
        (["eval=nonexistent"], "nonexistent"),
    ],
)
def test_bad_overrides_are_one_line_errors_before_any_work(saved_run, args, message):
    run_dir, _, _ = saved_run
    result = _evaluate(str(run_dir), *args, "--no-record")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr[-2000:]


def test_a_folder_that_is_not_a_run_is_a_one_line_error(tmp_path):
    result = _evaluate(str(tmp_path), "--no-record")
    assert result.returncode == 2 and "is not a run directory written by launch.py" in result.stderr


def test_two_evaluations_under_one_name_at_once_record_it_once(saved_run):
    # Both start together: the second finds the name being recorded (the first holds its lock) or,
    # if the first ended already, recorded. Either way one point at the step, and one error line.
    run_dir, client, run_id = saved_run
    command = [sys.executable, "-m", "soda.evaluate", str(run_dir), "eval.num_reconstructions=0", "--name", "race"]
    processes = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    processes.append(subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [(*process.communicate(timeout=600), process.returncode) for process in processes]
    results = [(code, out, err) for out, err, code in results]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    _, _, refused = next(result for result in results if result[0] == 2)
    lines = [line for line in refused.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), refused
    assert "race/... metrics are being recorded on this run by another evaluation (pid " in lines[0] or (
        "already has race/... metrics at epoch 1" in lines[0]
    ), lines[0]
    assert [m.step for m in client.get_metric_history(run_id, "race/knn_acc")] == [1]
    assert not list(run_dir.glob(".soda-evaluate-*"))  # the lock went with its owner


def test_a_name_being_recorded_is_refused_at_once_naming_its_owner(saved_run):
    from soda.files import OwnerLock

    run_dir, client, run_id = saved_run
    lock = OwnerLock(run_dir / ".soda-evaluate-held", refresh_seconds=60, stale_after_seconds=600)
    assert lock.try_acquire() is None  # this test's process records "held", as far as anyone can tell
    try:
        result = _evaluate(str(run_dir), "--name", "held")
    finally:
        lock.release()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(
        f"error: held/... metrics are being recorded on this run by another evaluation (pid {os.getpid()} "
    )
    assert "wait for it to end" in lines[0] and "another --name" in lines[0]
    assert "held/knn_acc" not in client.get_run(run_id).data.metrics
