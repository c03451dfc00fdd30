"""Hydra launchers for SODA jobs: hydra-submitit-launcher's, plus checks that turn a bad job
(tasks that do not match GPUs, a batch the ranks cannot share, an unknown partition) into one
line before anything is submitted, and `srun --kill-on-bad-exit` so one failed rank ends the job.

Select with `hydra/launcher=local` or `hydra/launcher=slurm` (conf/hydra/launcher/).

No `from __future__ import annotations` here: Hydra's plugin scan executes this module without
registering it in sys.modules, and dataclasses cannot resolve string annotations then.
"""

import shutil
import subprocess
from dataclasses import dataclass, field
from typing import List  # noqa: UP035 - OmegaConf needs typing's generics

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

from soda.errors import SodaError


class LauncherError(SodaError):
    pass


def _check_ranks(params: dict, config) -> None:
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


class SodaLocalLauncher(LocalLauncher):
    def launch(self, job_overrides, initial_job_idx):
        _check_ranks(self.params, self.config)
        if (self.params.get("nodes") or 1) != 1:
            raise LauncherError("hydra/launcher=local runs on this machine: hydra.launcher.nodes must be 1")
        return super().launch(job_overrides, initial_job_idx)


class SodaSlurmLauncher(SlurmLauncher):
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
        return super().launch(job_overrides, initial_job_idx)


@dataclass
class SodaLocalConf(LocalQueueConf):
    _target_: str = "hydra_plugins.soda_launchers.launchers.SodaLocalLauncher"


@dataclass
class SodaSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.soda_launchers.launchers.SodaSlurmLauncher"
    # If one rank dies, srun stops the others at once instead of leaving them in a collective.
    srun_args: List[str] = field(default_factory=lambda: ["--kill-on-bad-exit=1"])  # noqa: UP006


ConfigStore.instance().store(group="hydra/launcher", name="soda_local_base", node=SodaLocalConf, provider="soda")
ConfigStore.instance().store(group="hydra/launcher", name="soda_slurm_base", node=SodaSlurmConf, provider="soda")
