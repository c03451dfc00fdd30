"""The jobs that launches are waiting for, so that an interrupted sweeper can cancel them
(launching.submission.cancel_in_flight)."""

from __future__ import annotations

import logging
import threading
import time

from launching.adapters import submitit as submitit_adapter

log = logging.getLogger(__name__)
_JOBS: dict = {}  # job -> the Hydra job number it runs (a sweeper's trial number)
_LOCK = threading.Lock()
# One submission at a time. submitit's local executor starts a job's controller first and moves
# the job's pickle into the job's folder just after; the controller dies, leaving no log, if it
# looks for that folder first. Two threads pickling and submitting at once (a sweeper with
# n_jobs > 1) delayed the move past the controller's start (seen once in CI).
SUBMIT_LOCK = threading.Lock()


def add(jobs, numbers) -> None:
    """`jobs` run Hydra jobs `numbers` (in order)."""
    with _LOCK:
        _JOBS.update(zip(jobs, numbers, strict=True))


def remove(jobs) -> None:
    with _LOCK:
        for job in jobs:
            _JOBS.pop(job, None)


def cancel_all(grace_s: float = 15.0) -> dict[int, str]:
    """Cancel every job in flight (SLURM: scancel; local: SIGINT, then, for a job still alive
    after `grace_s` - a process started in the background ignores SIGINT - SIGKILL to the job's
    processes); returns {Hydra job number: job id} of the jobs cancelled."""
    with _LOCK:
        numbers = dict(_JOBS)
    jobs = list(numbers)
    for job in jobs:
        try:
            job.cancel(check=False)
        except Exception as error:  # a job that already ended, or an unreachable scheduler
            log.warning("could not cancel job %s: %s", job.job_id, error)
    local = [process for process in map(submitit_adapter.local_process, jobs) if process is not None]
    deadline = time.monotonic() + grace_s
    while any(process.poll() is None for process in local) and time.monotonic() < deadline:
        time.sleep(0.5)
    for process in local:
        if process.poll() is None:
            _kill_tree(process.pid)
    return {number: str(job.job_id) for job, number in numbers.items()}


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        for process in [*root.children(recursive=True), root]:
            process.kill()
    except psutil.NoSuchProcess:
        pass
