"""Preempting a job on the test cluster the way SLURM does, and losing one of its nodes, for
tests/test_distributed.py and the fault campaigns (tests/system/test_requeue.py, test_node_loss.py)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

SLURM_UP = Path(__file__).resolve().parents[2] / "scripts" / "slurm-up.sh"


def squeue(*args: str) -> str:
    return subprocess.run(["squeue", "-h", *args], capture_output=True, text=True).stdout


def preempt(job: str, check: bool = True) -> None:
    """What SLURM sends at preemption (submitit's own test helper sends the same two signals).
    check=False: the job may have ended meanwhile."""
    subprocess.run(["scancel", job, "--signal", "SIGTERM"], check=check)
    subprocess.run(["scancel", job, "--signal", "USR2"], check=check)


def release_requeued(job: str, alive: Callable[[], bool] = lambda: True, timeout: float = 120) -> bool:
    """A requeued job waits ~2 minutes before it may start again: release it as soon as it is
    pending. False if it never was within `timeout` seconds (or `alive()` turned false)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if "PENDING" in squeue("-j", job, "-o", "%T"):
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
            return True
        time.sleep(0.5)
    return False


def job_nodes(job: str) -> list[str]:
    """The host names of a running job's nodes, in SLURM's order (rank 0's first)."""
    listed = squeue("-j", job, "-o", "%N").strip()
    if not listed:
        return []
    shown = subprocess.run(["scontrol", "show", "hostnames", listed], capture_output=True, text=True)
    return shown.stdout.split()


def kill_node(node: str) -> None:
    """Lose a compute node of `make slurm-up` as a machine is lost: its link cut, every process on it
    (slurmd, the job's steps and ranks) killed."""
    subprocess.run(["bash", str(SLURM_UP), "kill-node", node], check=True, capture_output=True)


def start_node(node: str, timeout: float = 120) -> None:
    """Bring a lost node back and wait until SLURM has it idle again."""
    subprocess.run(["bash", str(SLURM_UP), "start-node", node], check=True, capture_output=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True, text=True).stdout
        if state.strip().startswith("idle"):
            return
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
        time.sleep(1)
    raise AssertionError(f"node {node} did not come back idle within {timeout:g} s")
