"""The jobs that launch() calls are waiting for, so that an interrupted sweeper can cancel them.

A module of its own, imported inside the launchers' methods: submitit pickles the launcher, and
Hydra's plugin scan loads launchers.py outside sys.modules, so cloudpickle copies that module's
globals by value; a lock among them could not be pickled (at requeue time, in the job).
"""

import logging
import threading

log = logging.getLogger(__name__)
_JOBS: set = set()
_LOCK = threading.Lock()


def add(jobs) -> None:
    with _LOCK:
        _JOBS.update(jobs)


def remove(jobs) -> None:
    with _LOCK:
        _JOBS.difference_update(jobs)


def cancel_all() -> int:
    """Cancel every job in flight (local: SIGINT to the job; SLURM: scancel); returns how many."""
    with _LOCK:
        jobs = list(_JOBS)
    for job in jobs:
        try:
            job.cancel(check=False)
        except Exception as error:  # a job that already ended, or an unreachable scheduler
            log.warning("could not cancel job %s: %s", job.job_id, error)
    return len(jobs)
