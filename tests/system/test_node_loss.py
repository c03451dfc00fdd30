"""Node loss: a 2-node SLURM job (2 ranks per node) whose second node is lost mid-epoch (its link
cut, every process on it killed, as a machine dies) must be requeued by SLURM once the node is
declared DOWN (SlurmdTimeout, 30 s on the test cluster), start again on the nodes it gets (another
node in place of the lost one) and end as the uninterrupted job does: one FINISHED MLflow run,
resumed from its last checkpoint, every epoch's evaluation once, no training step twice, and
metrics within rounding of the uninterrupted job's.

Within rounding, not equal: a job of more than 2 ranks resumed from a checkpoint is not bit-equal to
one that never stopped, on one machine too (a local 4-rank job SIGKILLed after epoch 2 and re-run
ended with exactly this test's numbers, both off the uninterrupted job's from the first resumed
epoch by ~1e-7 relative in train/loss). 2-rank jobs resume bit-equal (test_requeue.py), which
points at the order in which 3 or more ranks' gradients are summed; the cause is not pinned down.
Measured on the 6-epoch job: train/loss at most 2.5e-5 relative apart, eval/recon_mse 5.4e-4,
the probes' accuracies 1 test image of 128. Needs `make slurm-up` (3 compute nodes)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from soda.record import KNN_ACC, LINEAR_ACC, PREVIOUS_END, RECON_MSE, RESUMED, RUN_DIR, TRAIN_LOSS
from tests.support.services import needs_nodes
from tests.support.slurm import job_nodes, kill_node, release_requeued, squeue, start_node
from tests.system.campaign import Store, slurm_job

EPOCHS = 6
EXPERIMENT = "faults-node-loss"
REQUEUED_WITHIN_S = 90  # SlurmdTimeout (30 s) and the controller's ping interval, with room
# How far the resumed 4-rank job may end from the uninterrupted one (the module's docstring): 40x
# what was measured for the loss, 20x for the reconstruction error, 3 test images for a probe.
LOSS_RTOL, RECON_RTOL, ACCURACY_ATOL = 1e-3, 1e-2, 3 / 128


def submit(work: Path, name: str) -> subprocess.Popen:
    return slurm_job(
        work,
        name,
        EXPERIMENT,
        EPOCHS,
        "hydra.launcher.partition=multi",
        "hydra.launcher.nodes=2",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.cpus_per_task=1",
    )


def wait_for(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout:g} s")


@needs_nodes
@pytest.mark.slurm
def test_a_job_that_loses_a_node_is_requeued_and_resumes_on_other_nodes(work, record):
    reference = submit(work, "reference")
    output, _ = reference.communicate(timeout=900)
    assert reference.returncode == 0, f"the uninterrupted job failed:\n{output[-3000:]}"

    job = submit(work, "lost")
    lost = None
    try:
        running = wait_for(lambda: squeue("-n", "soda-faults-lost", "-t", "RUNNING", "-o", "%i").split(), 300, "start")
        job_id = running[0]
        first_nodes = job_nodes(job_id)
        # Mid-epoch, after the checkpoint of epoch 2: rank 0's log says epoch 3 has begun training.
        log = work / "lost" / "0" / "launch.log"
        wait_for(lambda: log.is_file() and "epoch 2/" in log.read_text(), 600, "epoch 2's end")
        time.sleep(2)
        lost = first_nodes[1]  # ranks 2 and 3; rank 0's node stays
        kill_node(lost)
        killed_at = time.monotonic()
        wait_for(lambda: "PENDING" in squeue("-j", job_id, "-o", "%T"), REQUEUED_WITHIN_S, "requeued")
        requeued_after = time.monotonic() - killed_at
        assert release_requeued(job_id), "the requeued job never waited to start again"
        second_nodes = wait_for(
            lambda: "RUNNING" in squeue("-j", job_id, "-o", "%T") and job_nodes(job_id), 120, "restart"
        )
        output, _ = job.communicate(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
        if lost is not None:
            start_node(lost)
    assert job.returncode == 0, f"the job that lost a node failed:\n{output[-3000:]}"
    assert f"job {job_id} was requeued by SLURM (1 requeue so far)" in output, output[-3000:]
    assert lost not in second_nodes and len(second_nodes) == 2, (first_nodes, second_nodes)
    record.facts.append(
        f"node {lost} of a 2x2 job lost mid-epoch 3; requeued {requeued_after:.0f} s later, "
        f"resumed on {','.join(second_nodes)}"
    )

    store = Store(f"sqlite:///{work}/mlflow.db", EXPERIMENT)
    runs = {}
    for name in ("reference", "lost"):
        found = store.runs(f"tags.{RUN_DIR} LIKE '{work}/{name}/%'")
        assert len(found) == 1, f"{name}: {len(found)} MLflow runs"
        store.assert_complete(found[0], EPOCHS, name)
        runs[name] = found[0]
    tags = runs["lost"].data.tags
    assert tags.get(RESUMED) == "true", "the job's run was never resumed"
    assert tags.get(PREVIOUS_END, "").startswith("lost"), tags.get(PREVIOUS_END)
    assert tags["world_size"] == "4" and tags["nodes"] == ",".join(second_nodes)
    lost_losses, losses = (
        {m.step: m.value for m in store.client.get_metric_history(runs[name].info.run_id, TRAIN_LOSS)}
        for name in ("lost", "reference")
    )
    assert lost_losses.keys() == losses.keys()
    assert all(abs(lost_losses[step] - loss) <= LOSS_RTOL * loss for step, loss in losses.items()), (
        lost_losses,
        losses,
    )
    finals, reference = store.finals(runs["lost"]), store.finals(runs["reference"])
    assert abs(finals[RECON_MSE] - reference[RECON_MSE]) <= RECON_RTOL * reference[RECON_MSE], (finals, reference)
    for key in (KNN_ACC, LINEAR_ACC):
        assert abs(finals[key] - reference[key]) <= ACCURACY_ATOL, (finals, reference)
