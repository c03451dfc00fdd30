"""Campaign `tracking_outage`: the tracking store goes away under a run. A real MLflow server
(on PostgreSQL) is killed mid-run: the run ends within tracking.timeout_s in one line, keeps its
checkpoint, and a re-run once the server is back continues the same MLflow run, which says how
the earlier process ended. A store deleted between two launches: the re-run refuses, or with
tracking.resume_without_record=true continues in a new run that says so."""

from __future__ import annotations

import signal
import subprocess
import time

import mlflow

from soda import tracking
from soda.loop import CHECKPOINT
from soda.record import KNN_ACC, LOST_RECORD, PREVIOUS_END, RECORD_STARTS_AT, RESUMED
from tests.support.services import MlflowServer, needs_postgres
from tests.system.campaign import REPO, TINY, Store, environment, launch_command, tracking_overrides

pytestmark = needs_postgres
TIMEOUT_S = 10


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@needs_postgres
def test_a_server_killed_mid_run_ends_it_in_one_line_and_the_rerun_continues_it(work, record):
    server = MlflowServer(work, workers=2)
    server.start()
    run_dir = work / "server-run"
    command = launch_command(
        *TINY,
        "schedule.epochs=3",
        "tracking=server",
        f"tracking.uri={server.uri}",
        "tracking.experiment=outage",
        f"tracking.timeout_s={TIMEOUT_S}",
        "tracking.system_metrics=false",
        f"hydra.run.dir={run_dir}",
    )
    try:
        process = subprocess.Popen(
            command, cwd=REPO, env=environment(work), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 300
        while not (run_dir / CHECKPOINT).exists():  # epoch 1 is checkpointed: now the server goes
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
            time.sleep(0.2)
        server.stop(signal.SIGKILL)
        killed = time.monotonic()
        output = process.communicate(timeout=TIMEOUT_S + 120)[0]
        waited = time.monotonic() - killed
        record.facts.append(f"server SIGKILLed after epoch 1: the run ended {waited:.0f} s later")
        assert process.returncode != 0, output[-3000:]
        errors = _errors(output)
        assert len(errors) == 1 and f"{server.uri} stopped answering for {TIMEOUT_S} s" in errors[0], output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        assert waited < TIMEOUT_S + 60, waited
        assert (run_dir / CHECKPOINT).exists() and (run_dir / tracking.END_FILE).exists()

        server.start()
        rerun = subprocess.run(command, cwd=REPO, env=environment(work), capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        store = Store(server.uri, "outage")
        [run] = store.runs_of(run_dir)
        store.assert_complete(run, epochs=3, what="the run the server outage cut")
        tags = run.data.tags
        assert tags[RESUMED] == "true"
        assert tags[PREVIOUS_END].startswith(f"tracking_lost: MLflow tracking store {server.uri}")
        assert not (run_dir / tracking.END_FILE).exists()
    finally:
        server.stop()


def test_a_deleted_store_is_not_silently_replaced_by_a_partial_record(work, record):
    run_dir = work / "deleted-store-run"
    store_path = work / "deleted.db"
    first = [*TINY, "schedule.epochs=1", *tracking_overrides(work, "deleted"), f"hydra.run.dir={run_dir}"]
    first[first.index(f"tracking.uri=sqlite:///{work}/mlflow.db")] = f"tracking.uri=sqlite:///{store_path}"
    done = subprocess.run(launch_command(*first), cwd=REPO, env=environment(work), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    lost = (run_dir / tracking.RUN_ID_FILE).read_text().strip()
    store_path.unlink()

    again = [*(a for a in first if a != "schedule.epochs=1"), "schedule.epochs=2"]
    refused = subprocess.run(launch_command(*again), cwd=REPO, env=environment(work), capture_output=True, text=True)
    assert refused.returncode != 0
    errors = _errors(refused.stderr)
    assert len(errors) == 1 and lost in errors[0] and "tracking.resume_without_record=true" in errors[0], refused.stderr
    assert (run_dir / tracking.RUN_ID_FILE).read_text().strip() == lost

    asked = subprocess.run(
        launch_command(*again, "tracking.resume_without_record=true"),
        cwd=REPO,
        env=environment(work),
        capture_output=True,
        text=True,
    )
    assert asked.returncode == 0, asked.stderr[-3000:]
    [run] = Store(f"sqlite:///{store_path}", "deleted").runs_of(run_dir)
    tags = run.data.tags
    assert tags[LOST_RECORD].startswith(lost) and tags[RECORD_STARTS_AT] == "1"
    client = mlflow.MlflowClient(f"sqlite:///{store_path}")
    assert [m.step for m in client.get_metric_history(run.info.run_id, KNN_ACC)] == [2]
    record.facts.append("a deleted store: refused, then a new run tagged lost_record from epoch 1")
