"""Submitting a launch's jobs through submitit and waiting for them: what the launchers in
hydra_plugins/soda_launchers do once their checks passed.

Each job runs a HydraJob, the callable submitit pickles: the job's composition and Hydra's
run_job, as hydra-submitit-launcher's launcher runs them. A SLURM job first checks, on its
node, that its Python exists and imports the project (preflight_line); when it does not, the job
ends with one line saying so, and that line is the launch's error.

Jobs in flight are kept in a registry (inflight.py) while a launch waits for them, so that a
sweeper that is interrupted can cancel them (cancel_in_flight) instead of leaving them running.

While it waits, a launch says how each job ended as it ends (finished with its final metrics,
failed with its error's first line, or stopped; and its log), then counts them in one line;
unless its launcher runs the trials of our Optuna sweeper, which says how each trial ended itself
(Launch.report_each_job).
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import filter_overrides
from omegaconf import DictConfig, OmegaConf, open_dict

from launching import failures, inflight, local, slurm
from launching.adapters import hydra as hydra_adapter
from launching.adapters import submitit as submitit_adapter
from launching.checks import LauncherError
from launching.jobs import job_settings
from soda import progress
from soda.record import KNN_ACC, LINEAR_ACC
from soda.store import redact

log = logging.getLogger(__name__)
_EXECUTOR_INIT_KEYS = ("submitit_folder", "max_num_timeout", "python")
_OUR_KEYS = ("threads_per_task", "dry_run", "network_interface")  # handled here, not by submitit
# What a job imports as it unpickles its HydraJob and config and runs the task.
PREFLIGHT_IMPORTS = "soda, submitit, hydra_plugins.soda_launchers"
POLL_S = 1.0  # how often a launch looks for jobs that ended
SCONTROL_EVERY_S = 10.0  # how often a launch asks scontrol about a SLURM job submitit has not seen end
_SACCT_SAID: list = []  # the one record of submitit's sacct warning let through


def _sacct_warning_once(record: logging.LogRecord) -> bool:
    """submitit warns at every status poll when sacct fails (a cluster without accounting); say it once."""
    if "Bypassing sacct error" not in record.getMessage():
        return True
    if not _SACCT_SAID:
        _SACCT_SAID.append(id(record))
    return _SACCT_SAID[0] == id(record)


logging.getLogger("submitit").addFilter(_sacct_warning_once)


class HydraJob:
    """What each submitted job runs (submitit pickles it, and unpickles it on the job's node):
    Hydra's run of the task with the job's overrides, as hydra-submitit-launcher's launcher runs
    it. An ordinary class of an ordinary module, so that it pickles by reference."""

    def __init__(self, hydra_context, config: DictConfig, task_function) -> None:
        self.hydra_context, self.config, self.task_function = hydra_context, config, task_function

    def __call__(self, sweep_overrides: list, job_dir_key: str, job_num: int, job_id: str, singleton_state: dict):
        import submitit
        from hydra.core.utils import run_job, setup_globals

        Singleton.set_state(singleton_state)
        setup_globals()
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, sweep_overrides)
        with open_dict(sweep_config.hydra.job) as job:
            job.id = submitit.JobEnvironment().job_id
            sweep_config.hydra.job.num = job_num
        return run_job(
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            config=sweep_config,
            job_dir_key=job_dir_key,
            job_subdir_key="hydra.sweep.subdir",
        )

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeued (preempted, timed out): run again with the same arguments."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


@dataclass
class Launch:
    """One launch() call of a launcher: what it submits, and how."""

    kind: str  # "local" or "slurm": submitit's executor
    params: dict  # hydra.launcher.*, resolved (local: GPUs resolved by the LocalPlan)
    config: DictConfig  # the sweep's config, `hydra` included
    job: HydraJob
    report_each_job: bool  # False under a sweeper that reports each trial itself


def sweeper_runs_trials(config: DictConfig) -> bool:
    """Whether the launch's sweeper is ours (hydra_plugins/soda_sweeper), which launches each trial
    on its own and says how each ended: what the dry run, which has the composition but no
    sweeper, reads; a launcher is told by the sweeper itself (run_trials)."""
    return "soda_sweeper" in str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))


def compose_jobs(hydra_context, config: DictConfig, job_overrides) -> list:
    """Each job's settings, composed and validated here as the job would (launching.jobs.job_settings),
    so that an unknown key or a bad value in any job stops the launch before anything runs."""
    settings = []
    with inflight.SUBMIT_LOCK:  # Hydra's config loader is shared by a sweeper's threads
        for overrides in job_overrides:
            settings.append(job_settings(hydra_context.config_loader.load_sweep_config(config, list(overrides))))
    return settings


def submit_and_wait(launch: Launch, job_overrides, initial_job_idx: int, plan: local.LocalPlan | None = None) -> list:
    """Submit every job (the local ones each with a GPU set of `plan`), wait until each ended
    (wait_for) and return their JobReturns."""
    executor = make_executor(launch.kind, launch.params)
    if plan is not None:
        local.quiet_controllers(executor)
        local.share_cores(plan)
    sweep_dir = Path(str(launch.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    job_params = []
    for offset, overrides in enumerate(job_overrides):
        number = initial_job_idx + offset
        log.info("\t#%d : %s", number, " ".join(redact(o) for o in filter_overrides(overrides)))
        job_params.append((list(overrides), "hydra.sweep.dir", number, f"job_id_for_{number}", Singleton.get_state()))
    jobs: list = []
    taken: list = []  # the GPU sets the local jobs hold, given back however the launch ends
    try:
        with inflight.SUBMIT_LOCK:
            if plan is not None:  # one job at a time, each with its own GPUs (map_array gives all the same)
                jobs = local.submit_local(executor, launch.job, job_params, plan, taken)
            else:
                jobs = executor.map_array(launch.job, *zip(*job_params, strict=True))
            inflight.add(jobs, [params[2] for params in job_params])
        return wait_for(jobs, job_overrides, initial_job_idx, sweep_dir, launch.report_each_job)
    finally:
        inflight.remove(jobs)
        local.release_gpus(taken)


def cancel_in_flight() -> dict[int, str]:
    """Cancel every job that a launch of this process waits for (inflight.cancel_all); returns
    {Hydra job number: job id} of the jobs cancelled. Each launch then returns once its jobs ended."""
    return inflight.cancel_all()


def wait_for(jobs, job_overrides, initial_job_idx: int, sweep_dir: Path, report_each_job: bool) -> list:
    """Each job's JobReturn, once every job ended, with a line on each job as it ends and a count
    at the end when `report_each_job` (the module's docstring); LauncherError, with the first job
    that handed back no result, when there is one."""
    shown = shown_overrides(job_overrides)
    started = time.monotonic()
    results, endings, failed = [None] * len(jobs), [], []
    waiting = dict(enumerate(jobs))
    watch = _EndWatch(started)
    while waiting:
        for index, job in list(waiting.items()):
            seen = watch.ended(index, job)
            if seen is None:
                continue
            del waiting[index]
            results[index], failure, ended = _collect(job, *seen, report_each_job)
            if failure is not None:
                failed.append(failure)
            if ended is not None:
                ending, detail, log_path = ended
                endings.append(ending)
                took = progress.duration(time.monotonic() - started)
                number = initial_job_idx + index
                log.info("\t#%d %s: %s after %s: %s; log: %s", number, shown[index], ending, took, detail, log_path)
        if waiting:
            time.sleep(POLL_S)
    if report_each_job:
        counts = ", ".join(f"{endings.count(e)} {e}" for e in ("finished", "failed", "stopped") if e in endings)
        log.info("%s: %s; sweep dir %s", progress.plural(len(jobs), "job"), counts, sweep_dir)
    if failed:
        raise LauncherError(failed[0])
    return results


class _EndWatch:
    """Which waiting jobs have ended. submitit sees a job end by its result file, or by sacct: one
    that ended without a result (cancelled, killed) on a cluster whose sacct does not answer would
    be waited for forever, so scontrol is asked now and then too."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.asked: dict = {}  # job index -> when scontrol was last asked about it
        self.seen_ended: dict = {}  # job index -> whether scontrol said it ended at the last look

    def ended(self, index: int, job) -> tuple | None:
        """(whether submitit saw it end, its preflight failure or None) once the job ended, else None."""
        done = job.done()
        # A job its preflight stopped ended, whatever the scheduler says (sacct lags, or answers
        # nothing on a cluster without accounting: submitit would wait forever).
        preflight = None if done else failures.preflight_failure(job)
        if done or preflight is not None:
            return done, preflight
        if time.monotonic() - self.asked.get(index, self.started) < SCONTROL_EVERY_S:
            return None
        self.asked[index] = time.monotonic()
        ended_before = self.seen_ended.get(index, False)
        self.seen_ended[index] = _is_slurm(job) and slurm.ended_per_scontrol(job.job_id) is not None
        # Ended at two looks in a row: a result file written at the end has had SCONTROL_EVERY_S
        # to appear on this host (network file systems lag).
        return (False, None) if ended_before and self.seen_ended[index] else None


def _is_slurm(job) -> bool:
    from submitit.slurm.slurm import SlurmJob

    return isinstance(job, SlurmJob)


def _collect(job, done: bool, preflight: tuple | None, report: bool) -> tuple:
    """(its JobReturn or None, the line of its failure or None, its ending when `report` or None)
    of a job that ended."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    if preflight is not None:
        return None, f"job {job.job_id}: {preflight[0]}", ("failed", *preflight) if report else None
    try:
        if not done:  # scontrol saw it end; submitit's results() would wait on
            state = slurm.final_state(job.job_id)
            raise UncompletedJobError(f"job {job.job_id} ended ({state}) without a result")
        result = job.results()[0]
        return result, None, ending(job, result) if report else None
    except (FailedJobError, UncompletedJobError) as error:
        # submitit's message quotes task 0's streams, often empty when another rank failed.
        return None, failures.job_failure(job, error), failures.crash(job, error) if report else None


def ending(job, result) -> tuple:
    """("finished" | "failed", what it ended with, its log) for a job that handed back its
    JobReturn: a finished run's objective and k-NN / linear accuracy (from its result file,
    soda.progress), or the error's first line."""
    from hydra.core.utils import JobStatus

    from soda.errors import first_line

    log_path = job.task(0).paths.stdout
    outcome = hydra_adapter.job_outcome(result)
    if result.status != JobStatus.COMPLETED:
        return "failed", f"{type(outcome).__name__}: {first_line(outcome)}", log_path
    output_dir = OmegaConf.select(result.hydra_cfg, "hydra.runtime.output_dir") if result.hydra_cfg else None
    final = progress.read_result(Path(str(output_dir))) if output_dir else None
    if final is None:
        return "finished", f"returned {outcome!r}", log_path
    metrics, objective = final.get("metrics", {}), final.get("objective", {})
    shown = [f"objective {name}={value:.4f}" for name, value in objective.items()]
    shown += [
        f"{name}={metrics[name]:.4f}" for name in (KNN_ACC, LINEAR_ACC) if name in metrics and name not in objective
    ]
    return "finished", f"epoch {final.get('epoch')}, " + ", ".join(shown), log_path


def shown_overrides(job_overrides) -> list:
    """Each job's overrides as its line shows them: those that differ between the jobs of the
    launch (`seed=1`), or all of them when none does."""
    jobs = [[redact(o) for o in filter_overrides(overrides)] for overrides in job_overrides]
    common = set.intersection(*map(set, jobs)) if len(jobs) > 1 else set()
    return [" ".join(o for o in overrides if o not in common) or " ".join(overrides) for overrides in jobs]


def make_executor(kind: str, params: dict):
    """submitit's executor (kind "local" or "slurm") with the launcher's settings (hydra.launcher.*,
    resolved): what a launch submits through, and what the dry run asks for the scripts it would
    submit. A SLURM job runs the preflight line after the `setup` lines. Creates nothing on disk."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    init = {f"{kind}_{key}": params[key] for key in _EXECUTOR_INIT_KEYS[1:] if key in params}
    executor = submitit.AutoExecutor(folder=params["submitit_folder"], cluster=kind, **init)
    base_keys = set(BaseQueueConf.__dataclass_fields__)
    settings = {
        (key if key in base_keys else f"{kind}_{key}"): value
        for key, value in params.items()
        if key not in _EXECUTOR_INIT_KEYS + _OUR_KEYS
    }
    if kind == "slurm":
        # submitit's python: hydra.launcher.python as given (a shell word), else this interpreter, quoted.
        python = submitit_adapter.job_python(executor)
        settings["slurm_setup"] = [*node_environment(params), *(params.get("setup") or []), preflight_line(python)]
    executor.update_parameters(**settings)
    return executor


def submission_script(executor, jobs: int) -> str:
    """The sbatch script a SLURM executor submits for `jobs` jobs at once: one plain job, or one job
    array (as submitit's SlurmExecutor submits a map_array of several)."""
    return submitit_adapter.submission_script(executor, jobs)


def node_environment(params: dict) -> list[str]:
    """The shell lines a SLURM job runs first, before the `setup` lines (which may override them);
    srun hands the environment they set to every rank, on every node:
    - OMP_NUM_THREADS = the CPUs SLURM gives each task (cpus_per_task), unless already set: without
      CPU binding, each rank's torch would otherwise start a thread per core of the node;
    - GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME = hydra.launcher.network_interface, when set: the
      interface the ranks of a multi-node job talk over (soda.dist checks it exists on each node)."""
    lines = [
        '[ -n "${OMP_NUM_THREADS:-}" ] || [ -z "${SLURM_CPUS_PER_TASK:-}" ] || export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK'
    ]
    interface = params.get("network_interface")
    if interface:
        quoted = shlex.quote(str(interface))
        lines.append(f"export GLOO_SOCKET_IFNAME={quoted} NCCL_SOCKET_IFNAME={quoted}")
    return lines


def preflight_line(python: str) -> str:
    """The shell line a SLURM job runs before srun: `python` (a shell command, as submitit runs it)
    must be found and import the project, else the job prints one line (failures.PREFLIGHT, the node,
    the interpreter as `command -v` finds it, what failed, what to do) to stderr and exits 1. Without
    it a job whose node lacks the environment ends with submitit's 'has not produced any output'."""
    imports = shlex.quote(f"import {PREFLIGHT_IMPORTS}")
    advice = "activate the project's environment in hydra.launcher.setup, or set hydra.launcher.python"
    return (
        f"soda_python=({python}); "
        'if ! soda_found=$(command -v "${soda_python[0]}"); then '
        'soda_problem="${soda_python[0]} was not found"; '
        f"elif ! soda_problem=$({python} -c {imports} 2>&1 >/dev/null); then "
        "soda_problem=\"$soda_found cannot import the project (${soda_problem##*$'\\n'})\"; "
        "else soda_problem=; fi; "
        'if [ -n "$soda_problem" ]; then '
        f'echo "{failures.PREFLIGHT} on $(hostname): the job\'s Python $soda_problem; {advice}" >&2; exit 1; fi'
    )
