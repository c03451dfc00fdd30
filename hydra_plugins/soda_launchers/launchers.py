"""Hydra launchers for SODA jobs: hydra-submitit-launcher's, plus checks that turn a bad job
(tasks that do not match GPUs, a batch the ranks cannot share, an unknown partition) into one
line before anything is submitted, and `srun --kill-on-bad-exit` so one failed rank ends the job.

Select with `hydra/launcher=local` or `hydra/launcher=slurm` (conf/hydra/launcher/); `local` is
the default for multiruns, so every job is its own process.

Jobs in flight are kept in a registry (inflight.py) while `launch` waits for them, so that a
sweeper that is interrupted can cancel them instead of leaving them running on the cluster.

No `from __future__ import annotations` here: Hydra's plugin scan executes this module without
registering it in sys.modules, and dataclasses cannot resolve string annotations then.
"""

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional  # noqa: UP035 - OmegaConf needs typing's generics

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

from soda.errors import SodaError

log = logging.getLogger(__name__)
_SET_BY_US: set = set()  # OMP_NUM_THREADS values this module set (so it may set them again)
_EXECUTOR_INIT_KEYS = ("submitit_folder", "max_num_timeout")
_OUR_KEYS = ("threads_per_task",)  # handled here, not by submitit


class LauncherError(SodaError):
    pass


class _TrackedLaunch:
    """hydra-submitit-launcher's launch, written against submitit's public API, keeping the
    submitted jobs in the registry while it waits for them. Safe to call from several threads
    (a sweeper keeping several trials in flight): each call has its own executor."""

    _EXECUTOR: str
    params: dict

    def _submit_and_wait(self, job_overrides, initial_job_idx):
        import submitit

        from hydra_plugins.soda_launchers import inflight

        init = {f"{self._EXECUTOR}_{key}": self.params[key] for key in _EXECUTOR_INIT_KEYS[1:] if key in self.params}
        executor = submitit.AutoExecutor(folder=self.params["submitit_folder"], cluster=self._EXECUTOR, **init)
        base_keys = set(BaseQueueConf.__dataclass_fields__)
        executor.update_parameters(
            **{
                (key if key in base_keys else f"{self._EXECUTOR}_{key}"): value
                for key, value in self.params.items()
                if key not in _EXECUTOR_INIT_KEYS + _OUR_KEYS
            }
        )
        if self._EXECUTOR == "local":
            self._share_cores(len(job_overrides))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        job_params = []
        for offset, overrides in enumerate(job_overrides):
            number = initial_job_idx + offset
            log.info("\t#%d : %s", number, " ".join(filter_overrides(overrides)))
            job_params.append(
                (list(overrides), "hydra.sweep.dir", number, f"job_id_for_{number}", Singleton.get_state())
            )
        with inflight.SUBMIT_LOCK:
            jobs = executor.map_array(self, *zip(*job_params, strict=True))
        inflight.add(jobs)
        try:
            return [job.results()[0] for job in jobs]
        finally:
            inflight.remove(jobs)


def _check_ranks(params: dict, config) -> None:
    for key, least in (("tasks_per_node", 1), ("nodes", 1), ("gpus_per_node", 0), ("timeout_min", 1)):
        value = params.get(key)
        if value is not None and (not isinstance(value, int) or value < least):
            raise LauncherError(f"hydra.launcher.{key}={value!r} must be a whole number >= {least}")
    gpus = params.get("gpus_per_node") or 0
    tasks = params.get("tasks_per_node") or 1
    nodes = params.get("nodes") or 1
    if gpus and tasks != gpus:
        raise LauncherError(
            f"hydra.launcher.tasks_per_node={tasks} but gpus_per_node={gpus}: a job runs one DDP rank per "
            f"GPU, so set hydra.launcher.tasks_per_node={gpus}"
        )
    world = tasks * nodes
    batch = config.schedule.batch_size
    if batch % world:
        raise LauncherError(
            f"schedule.batch_size={batch} is not divisible by the {world} ranks of each job (nodes x "
            f"tasks_per_node); choose a multiple of {world}"
        )


class SodaLocalLauncher(_TrackedLaunch, LocalLauncher):
    jobs_at_once: int | None = None  # set by a sweeper that keeps several launch() calls in flight

    def _share_cores(self, jobs_in_this_call: int) -> None:
        """Local jobs share this machine: give each task its share of the cores as its thread
        count (OMP_NUM_THREADS, which the jobs inherit), unless the user chose one. Without it
        every process starts one thread per core and they slow each other down several-fold."""
        threads = self.params.get("threads_per_task")
        if threads is None:
            if "OMP_NUM_THREADS" in os.environ and not _SET_BY_US:
                return
            jobs = max(self.jobs_at_once or 1, jobs_in_this_call)
            tasks = self.params.get("tasks_per_node") or 1
            threads = max(1, len(os.sched_getaffinity(0)) // (jobs * tasks))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        _SET_BY_US.add(str(threads))

    def launch(self, job_overrides, initial_job_idx):
        _check_ranks(self.params, self.config)
        if (self.params.get("nodes") or 1) != 1:
            raise LauncherError("hydra/launcher=local runs on this machine: hydra.launcher.nodes must be 1")
        return self._submit_and_wait(job_overrides, initial_job_idx)


class SodaSlurmLauncher(_TrackedLaunch, SlurmLauncher):
    def launch(self, job_overrides, initial_job_idx):
        _check_ranks(self.params, self.config)
        if shutil.which("sbatch") is None:
            raise LauncherError("hydra/launcher=slurm needs SLURM's sbatch on PATH; run on a cluster login node")
        partition = self.params.get("partition")
        if partition:
            found = subprocess.run(["scontrol", "show", "partition", partition], capture_output=True, text=True)
            if found.returncode != 0:
                message = (found.stderr or found.stdout).strip().splitlines()[0]
                raise LauncherError(f"SLURM: {message} (hydra.launcher.partition={partition}; see `sinfo`)")
        return self._submit_and_wait(job_overrides, initial_job_idx)


@dataclass
class SodaLocalConf(LocalQueueConf):
    _target_: str = "hydra_plugins.soda_launchers.launchers.SodaLocalLauncher"
    # Threads per task (OMP_NUM_THREADS); null: this machine's cores / (jobs at once x tasks).
    threads_per_task: Optional[int] = None  # noqa: UP045


@dataclass
class SodaSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.soda_launchers.launchers.SodaSlurmLauncher"
    # If one rank dies, srun stops the others at once instead of leaving them in a collective.
    srun_args: List[str] = field(default_factory=lambda: ["--kill-on-bad-exit=1"])  # noqa: UP006


ConfigStore.instance().store(group="hydra/launcher", name="soda_local_base", node=SodaLocalConf, provider="soda")
ConfigStore.instance().store(group="hydra/launcher", name="soda_slurm_base", node=SodaSlurmConf, provider="soda")
