"""The headline command, `python launch.py -m sweep=augment_ablation`, exactly as typed, on the
SLURM cluster of `make slurm-up`, with a site profile that scales the model and data down: every
trial ends as a finished SLURM job, the sweep has its parent run, and the ablation table comes out
of the records. Twice: with a profile of one task on this machine's node, and with a 2-node profile
(2 tasks on each of 2 namespaced compute nodes, partition multi), whose trials run as 2-node jobs."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from soda.record import PARENT_RUN, SWEEP, SWEEP_PARENT
from tests.helpers import SMOKE
from tests.support.services import multi_node_available, needs_slurm

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("dataset", "model", "schedule")


# The profiles' SLURM resources: one task on this machine's node, or 2 tasks on each of 2 nodes.
ONE_NODE = {"partition": "debug", "cpus_per_task": 1}
TWO_NODES = {"partition": "multi", "nodes": 2, "tasks_per_node": 2, "cpus_per_task": 1}


def smoke_profile(marker: Path, resources: dict = ONE_NODE) -> dict:
    """A SLURM profile for the test cluster: the headline command at smoke size (tests/helpers.py)
    on `resources`, each job activating the project's virtualenv in its setup lines and running the
    `python` that puts on PATH, and leaving a mark that the setup ran."""
    values: dict = {"defaults": [{"override /hydra/launcher": "slurm"}]}
    for override in SMOKE:
        key, value = override.split("=", 1)
        if key in GROUPS:
            values["defaults"].append({f"override /{key}": value})
            continue
        node = values
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = yaml.safe_load(value)
    values["hydra"] = {
        "launcher": {
            **resources,
            "timeout_min": 10,
            "python": "python",
            "setup": [f"source {REPO}/.venv/bin/activate", f'echo "$(command -v python)" >> {marker}'],
        }
    }
    values["sweep"] = {"n_jobs": 2}
    return values


def scontrol_state(job: str, timeout: float = 60) -> str:
    """The job's final state and its number of nodes, `COMPLETED on 2` (its result can come back
    while srun is still ending the job)."""
    deadline = time.monotonic() + timeout
    while True:
        shown = subprocess.run(["scontrol", "show", "job", job, "--oneliner"], capture_output=True, text=True)
        found = re.search(r"\bJobState=(\w+)", shown.stdout)
        state = found[1] if found else f"unknown ({(shown.stderr or shown.stdout).strip()})"
        if state not in ("RUNNING", "COMPLETING") or time.monotonic() > deadline:
            nodes = re.search(r"\bNumNodes=(\d+)", shown.stdout)
            return f"{state} on {nodes[1] if nodes else '?'}"
        time.sleep(1)


@pytest.mark.heavy
@pytest.mark.slurm
@needs_slurm
@pytest.mark.parametrize(
    "resources",
    [
        pytest.param(ONE_NODE, id="one-node"),
        pytest.param(
            TWO_NODES,
            id="two-nodes",
            marks=pytest.mark.skipif(not multi_node_available(), reason="no multi-node partition (`make slurm-up`)"),
        ),
    ],
)
def test_the_headline_command_as_typed_runs_the_ablation_as_slurm_jobs(tmp_path, resources):
    # A checkout of the project in a folder of its own, so that the command runs as typed there
    # and its default stores (mlflow.db, optuna-journal.log, multirun/) land in that folder.
    checkout = tmp_path / "soda"
    checkout.mkdir()
    for name in ("launch.py", "conf", "sweeps"):
        (checkout / name).symlink_to(REPO / name)
    marker = tmp_path / "setup-ran"
    profile = tmp_path / "cluster.yaml"
    profile.write_text("# @package _global_\n" + yaml.safe_dump(smoke_profile(marker, resources), sort_keys=False))
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if ".venv" not in p)
    env = {**os.environ, "SODA_SITE": str(profile), "PATH": path}
    env.pop("VIRTUAL_ENV", None)
    for name in ("SODA_TRACKING_URI", "SODA_SWEEP_STORAGE", "SODA_STORE_DIR", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)

    command = "python launch.py -m sweep=augment_ablation"
    launched = subprocess.run(
        [sys.executable, *command.split()[1:]], cwd=checkout, env=env, capture_output=True, text=True, timeout=1500
    )
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    lines = launched.stdout.splitlines()
    assert lines[0] == f"site profile {profile}: hydra/launcher=slurm (partition {resources['partition']})"

    # Every trial of the grid finished, each as a SLURM job of its own, on the profile's nodes, that
    # ended COMPLETED.
    done = [line for line in lines if re.search(r"trial \d+ COMPLETE, \d+/12 done", line)]
    assert len(done) == 12, launched.stdout[-3000:]
    sweep_dirs = list((checkout / "multirun" / "augment_ablation").iterdir())
    assert len(sweep_dirs) == 1
    jobs = sorted(p.name for p in (sweep_dirs[0] / ".submitit").iterdir() if p.name.isdigit())
    assert len(jobs) == 12
    nodes = resources.get("nodes", 1)
    assert {job: scontrol_state(job) for job in jobs} == dict.fromkeys(jobs, f"COMPLETED on {nodes}")
    # The profile's setup lines ran before each job and put the virtualenv's python first.
    assert marker.read_text().splitlines() == [str(REPO / ".venv" / "bin" / "python")] * 12

    # The sweep's parent run and its 12 children in the embedded store, then the ablation table.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{checkout / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("soda")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [run for run in runs if run.data.tags.get(SWEEP) == SWEEP_PARENT]
    children = [run for run in runs if run.data.tags.get(PARENT_RUN)]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 12 and {run.data.tags[PARENT_RUN] for run in children} == {parents[0].info.run_id}
    assert all(run.info.status == "FINISHED" for run in children)
    world_size = str(nodes * resources.get("tasks_per_node", 1))
    assert {run.data.tags["world_size"] for run in children} == {world_size}
    assert {len(run.data.tags["nodes"].split(",")) for run in children} == {nodes}
    table = subprocess.run(
        [sys.executable, "-m", "analysis", "ablation"], cwd=checkout, env=env, capture_output=True, text=True
    )
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if re.match(r"\s*(reference|flip|none)\b", line)]
    assert len(rows) == 6, table.stdout  # 3 target views x 2 source views, 2 seeds each
