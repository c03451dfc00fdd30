"""Hydra launchers for SODA jobs (`hydra/launcher=local`, `hydra/launcher=slurm`, conf/hydra/launcher/;
`local` is the default for multiruns, so every job is its own process): hydra-submitit-launcher's,
plus checks that turn a bad job into one line before anything is submitted, `srun
--kill-on-bad-exit` so one failed rank ends the job, and a one-line report naming the rank that
failed first when a job dies. `hydra.launcher.dry_run=true` on the command line shows what would
be submitted instead (launching/dryrun.py); a launcher given it submits nothing.

This module is the plugin classes and their config schemas; the logic lives in launching/
(submission.py: submitting and waiting; local.py: the local GPU plan; checks.py; failures.py).

A sweeper that says how each trial ended itself and keeps several launches in flight (ours,
hydra_plugins/soda_sweeper) calls `run_trials(jobs_at_once)` once, after setup.

No `from __future__ import annotations` here: Hydra's plugin scan executes this module before it
registers it in sys.modules, and dataclasses cannot resolve string annotations then.
"""

from dataclasses import dataclass, field
from typing import List, Optional  # OmegaConf needs typing's generics

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

from launching import checks, local, submission


class _SodaLauncher:
    """What both launchers share: the agreement with a sweeper (run_trials), and the Launch that
    launching.submission submits."""

    jobs_at_once: Optional[int] = None  # launch() calls a sweeper keeps in flight; None: one
    runs_trials: bool = False  # True under a sweeper that says how each trial ended itself

    def run_trials(self, jobs_at_once: int) -> None:
        """Called by a sweeper that keeps `jobs_at_once` launch() calls in flight (local jobs share
        the machine between them), says how each trial ended itself (launch() then does not), and
        whose trials write to sweep.storage (checks.warn_about_file_stores)."""
        self.jobs_at_once = jobs_at_once
        self.runs_trials = True

    def _launch(self, params: dict) -> submission.Launch:
        job = submission.HydraJob(self.hydra_context, self.config, self.task_function)
        return submission.Launch(self._EXECUTOR, params, self.config, job, report_each_job=not self.runs_trials)


class SodaLocalLauncher(_SodaLauncher, LocalLauncher):
    def launch(self, job_overrides, initial_job_idx):
        checks.refuse_a_dry_run(self.params)
        settings = submission.compose_jobs(self.hydra_context, self.config, job_overrides)
        at_once = max(self.jobs_at_once or 1, len(job_overrides))
        plan = local.plan_launch(self.params, at_once, settings, initial_job_idx)
        return submission.submit_and_wait(self._launch(plan.params), job_overrides, initial_job_idx, plan)


class SodaSlurmLauncher(_SodaLauncher, SlurmLauncher):
    def launch(self, job_overrides, initial_job_idx):
        checks.refuse_a_dry_run(self.params)
        settings = submission.compose_jobs(self.hydra_context, self.config, job_overrides)
        checks.check_slurm_launch(self.params, settings, self.runs_trials, initial_job_idx)
        return submission.submit_and_wait(self._launch(self.params), job_overrides, initial_job_idx)


@dataclass
class SodaLocalConf(LocalQueueConf):
    _target_: str = "hydra_plugins.soda_launchers.launchers.SodaLocalLauncher"
    # GPUs per job; null: this machine's GPUs shared out among the jobs at once (local_plan); 0: CPUs.
    gpus_per_node: Optional[int] = None
    # DDP ranks per job; null: one per GPU the job gets, else 1.
    tasks_per_node: Optional[int] = None
    # Threads per task (OMP_NUM_THREADS); null: this machine's cores / (jobs at once x tasks).
    threads_per_task: Optional[int] = None
    # On the command line: list the jobs and how they would run, start none (launching/dryrun.py).
    dry_run: bool = False


@dataclass
class SodaSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.soda_launchers.launchers.SodaSlurmLauncher"
    # If one rank dies, srun stops the others at once instead of leaving them in a collective.
    srun_args: List[str] = field(default_factory=lambda: ["--kill-on-bad-exit=1"])
    # The job's Python on the node, a shell command; null: the one that submits (sys.executable).
    python: Optional[str] = None
    # The network interface the ranks of a multi-node job talk over (GLOO_SOCKET_IFNAME and
    # NCCL_SOCKET_IFNAME); null: gloo's and NCCL's own choice (launching/submission.node_environment).
    network_interface: Optional[str] = None
    # On the command line: show each job's sbatch script and SLURM's verdict, submit none (launching/dryrun.py).
    dry_run: bool = False


# The launchers' schemas, outside the hydra/launcher group so that they are not offered as its
# options: conf/hydra/launcher/{local,slurm}.yaml build on them (`/soda_schema_launcher_local@_here_`).
ConfigStore.instance().store(name="soda_schema_launcher_local", node=SodaLocalConf, provider="soda")
ConfigStore.instance().store(name="soda_schema_launcher_slurm", node=SodaSlurmConf, provider="soda")
