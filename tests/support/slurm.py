"""Preempting a job on the test cluster the way SLURM does, for tests/test_distributed.py and the
fault campaign (tests/system/test_requeue.py)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable


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
