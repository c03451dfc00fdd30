"""Multi-node jobs on the namespaced compute nodes of `make slurm-up` (partition multi): 2 nodes x
2 tasks train as one 4-rank job over the nodes' network and end with exactly the metrics of 4
ranks on one machine; a rank that cannot reach the rendezvous ends the job in one line naming the
address and port. (A node lost mid-epoch: tests/system/test_node_loss.py.)"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from soda.record import RUN_DIR, TRAIN_LOSS
from tests.support.services import needs_nodes
from tests.system.campaign import REPO, TINY, Store, environment, launch_command, tracking_overrides

pytestmark = [pytest.mark.slurm, pytest.mark.heavy, needs_nodes]

EPOCHS = 2
EXPERIMENT = "nodes"
TWO_NODES = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=multi",
    "hydra.launcher.nodes=2",
    "hydra.launcher.tasks_per_node=2",
    "hydra.launcher.cpus_per_task=1",
]


def launch(work: Path, name: str, *overrides: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        launch_command(
            "-m",
            *TINY,
            f"schedule.epochs={EPOCHS}",
            *tracking_overrides(work, EXPERIMENT),
            f"hydra.sweep.dir={work}/{name}",
            *overrides,
        ),
        cwd=REPO,
        env=environment(work),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rank_hosts(sweep_dir: Path) -> dict[int, str]:
    """Each rank's host, as submitit's first log line of each task says it."""
    hosts = {}
    for log in (sweep_dir / ".submitit").rglob("*_log.out"):
        found = re.search(r"JobEnvironment\(.*hostname=([^,]+),.*global_rank=(\d+)\(", log.read_text())
        if found:
            hosts[int(found[2])] = found[1]
    return hosts


def test_two_nodes_of_two_ranks_end_exactly_as_four_ranks_on_one_machine(tmp_path):
    two_nodes = launch(tmp_path, "two-nodes", *TWO_NODES, "hydra.launcher.network_interface=eth0")
    assert two_nodes.returncode == 0, two_nodes.stdout[-2000:] + two_nodes.stderr[-2000:]
    one_machine = launch(tmp_path, "one-machine", "hydra/launcher=local", "hydra.launcher.tasks_per_node=4")
    assert one_machine.returncode == 0, one_machine.stdout[-2000:] + one_machine.stderr[-2000:]

    # Two ranks on each of two compute nodes: their traffic crossed the nodes' bridge.
    hosts = rank_hosts(tmp_path / "two-nodes")
    assert sorted(hosts) == [0, 1, 2, 3], hosts
    assert hosts[0] == hosts[1] != hosts[2] == hosts[3] and all(h.startswith("soda-n") for h in hosts.values())

    store = Store(f"sqlite:///{tmp_path}/mlflow.db", EXPERIMENT)
    runs = {}
    for name in ("two-nodes", "one-machine"):
        (run,) = store.runs(f"tags.{RUN_DIR} LIKE '{tmp_path}/{name}/%'")
        store.assert_complete(run, EPOCHS, name)
        assert run.data.tags["world_size"] == "4"
        runs[name] = run
    assert runs["two-nodes"].data.tags["nodes"] == f"{hosts[0]},{hosts[2]}"

    # The same ranks, seeds, batches, gloo ring and threads per rank (OMP_NUM_THREADS=1 from
    # cpus_per_task, and the local launcher's share of 2 cores): only the transport differs, so
    # every logged number is equal to the last bit.
    def history(run, key):
        return [(m.step, m.value) for m in store.client.get_metric_history(run.info.run_id, key)]

    keys = sorted(key for key in runs["one-machine"].data.metrics if key.startswith(("eval/", "train/loss")))
    keys = [key for key in keys if key != "eval/seconds"]
    assert TRAIN_LOSS in keys and "eval/linear_acc" in keys
    for key in keys:
        assert history(runs["two-nodes"], key) == history(runs["one-machine"], key), key


def test_a_rank_that_cannot_reach_the_rendezvous_ends_the_job_in_one_line(tmp_path):
    # MASTER_ADDR=localhost, as on one machine: rank 0's node hosts the rendezvous there, but the
    # other node's ranks find nothing on their own loopback.
    started = time.monotonic()
    result = launch(
        tmp_path,
        "unreachable",
        *TWO_NODES,
        'hydra.launcher.setup=["export MASTER_ADDR=localhost MASTER_PORT=29411"]',
        "rendezvous_timeout_s=5",
        timeout=300,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 2
    # One error line and no traceback (submitit's and sacct's complaints on a cluster without
    # accounting aside, which the launch's polling prints).
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.fullmatch(
        r"error: rank ([23]) failed: soda\.errors\.RendezvousError: rank \1 on soda-n\d could not reach the "
        r"rendezvous at localhost:29411 \(MASTER_ADDR:MASTER_PORT\) within 5 s: Connection refused; .*; full log: \S+",
        lines[0],
    ), lines[0]
    assert elapsed < 120, f"the job took {elapsed:.0f} s to end"
    assert Store(f"sqlite:///{tmp_path}/mlflow.db", EXPERIMENT).runs() == [], "ranks that never met recorded a run"
