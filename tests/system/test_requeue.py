"""Requeue: a 2-task SLURM job preempted the way SLURM preempts (SIGTERM, then USR2, submitit's
signal) at random moments and requeued each time must end as an uninterrupted job does: one
FINISHED MLflow run, resumed, every epoch's evaluation once, no training step twice, final
metrics equal to the uninterrupted job's. Needs `make slurm-up`."""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import pytest

from soda.record import RESUMED, RUN_DIR
from tests.support.services import needs_slurm
from tests.support.slurm import preempt, release_requeued, squeue
from tests.system.campaign import Store, slurm_job

EPOCHS = 8  # room for 3 preemptions at random moments: with one thread per rank, 4 epochs ended first
EXPERIMENT = "faults-requeue"
REQUEUES = 3


def submit(work: Path, name: str) -> subprocess.Popen:
    return slurm_job(
        work, name, EXPERIMENT, EPOCHS, "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1"
    )


def preempt_while_running(driver: subprocess.Popen, name: str, times: int, rng: random.Random) -> int:
    """Preempt the job named `name` at a random moment of each incarnation's life, release it
    from the requeue wait at once; how many preemptions landed before the job ended."""
    done = 0
    while done < times and driver.poll() is None:
        running = squeue("-n", name, "-t", "RUNNING", "-o", "%i").split()
        if not running:
            time.sleep(0.5)
            continue
        time.sleep(rng.uniform(3, 25))
        if "RUNNING" not in squeue("-j", running[0], "-o", "%T"):
            continue
        preempt(running[0], check=False)
        done += 1
        release_requeued(running[0], alive=lambda: driver.poll() is None)
    return done


@needs_slurm
@pytest.mark.slurm
@pytest.mark.slow
def test_a_preempted_and_requeued_job_ends_as_an_uninterrupted_one(work, record):
    reference = submit(work, "reference")
    output, _ = reference.communicate(timeout=1200)
    assert reference.returncode == 0, f"the uninterrupted job failed:\n{output[-3000:]}"

    storm = submit(work, "storm")
    try:
        done = preempt_while_running(storm, "soda-faults-storm", REQUEUES, random.Random(0))
        record.counts["requeues"] += done
        output, _ = storm.communicate(timeout=1800)
    finally:
        if storm.poll() is None:
            storm.kill()
    assert done == REQUEUES, f"only {done} of {REQUEUES} preemptions landed before the job ended"
    assert storm.returncode == 0, f"the preempted job failed:\n{output[-3000:]}"

    store = Store(f"sqlite:///{work}/mlflow.db", EXPERIMENT)
    run_of = {}
    for name in ("reference", "storm"):
        runs = store.runs(f"tags.{RUN_DIR} LIKE '{work}/{name}/%'")
        assert len(runs) == 1, f"{name}: {len(runs)} MLflow runs"
        store.assert_complete(runs[0], EPOCHS, name)
        run_of[name] = runs[0]
    assert run_of["storm"].data.tags.get(RESUMED) == "true", "the preempted job's run was never resumed"
    assert store.finals(run_of["storm"]) == store.finals(run_of["reference"]), (
        "final metrics differ from the uninterrupted job's"
    )
