"""Local jobs (`hydra/launcher=local`): how they share this machine's GPUs and cores, what the
local launcher refuses, and how each job's controller is started (launching/controller.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from dataclasses import dataclass

from launching import checks, site
from launching.adapters import submitit as submitit_adapter
from launching.checks import LauncherError

log = logging.getLogger(__name__)
_SET_BY_US: set = set()  # OMP_NUM_THREADS values this module set (so it may set them again)
_GPU_USE: dict = {}  # GPU set -> local jobs holding it now (a sweeper's threads launch at once)
_GPU_LOCK = threading.Lock()  # guards _GPU_USE


@dataclass(frozen=True)
class LocalPlan:
    """How local jobs use this machine's GPUs: `params` are the launcher's with gpus_per_node and
    tasks_per_node resolved; each job takes one of `groups` (GPU ids, as CUDA_VISIBLE_DEVICES names
    them), the least used one; `line` says it all."""

    params: dict
    groups: tuple
    jobs_at_once: int
    line: str
    why_no_gpu: str  # why a job gets no GPU (when it gets none)


def local_plan(params: dict, jobs_at_once: int, visible: site.VisibleGPUs) -> LocalPlan:
    """The GPUs of local jobs, `jobs_at_once` of them running together. gpus_per_node null (the
    default): every GPU the machine shows, shared out (one DDP rank each, tasks_per_node null):
    all of them to one job when one runs at a time, else an equal share to each job, or one GPU
    each, jobs taking turns on them, when more jobs than GPUs run at once. An explicit
    gpus_per_node must be there (0 = CPUs, CUDA_VISIBLE_DEVICES empty)."""
    gpus, tasks = params.get("gpus_per_node"), params.get("tasks_per_node")
    count = len(visible)
    if gpus is None:
        why_no_gpu = f"this machine shows {visible.text}"
        gpus = 0 if not count else (min(tasks, count) if tasks is not None else max(1, count // jobs_at_once))
    elif gpus > count:
        raise LauncherError(
            f"hydra.launcher.gpus_per_node={gpus} but this machine shows {visible.text}; set "
            f"hydra.launcher.gpus_per_node={count} (or null: every GPU it shows)"
        )
    else:
        why_no_gpu = "hydra.launcher.gpus_per_node=0"
    tasks = tasks if tasks is not None else max(gpus, 1)
    resolved = {**params, "gpus_per_node": gpus, "tasks_per_node": tasks}
    at_once = f"{jobs_at_once} job{'s' * (jobs_at_once != 1)} at once"
    ranks = f"{tasks} DDP rank{'s' * (tasks != 1)}"
    if not gpus:
        groups = ((),)
        line = f"{why_no_gpu}: jobs run on CPUs, each {ranks}, {at_once}"
    else:
        groups = tuple(visible.ids[start : start + gpus] for start in range(0, count - gpus + 1, gpus))
        shared = "; more jobs than GPU sets, so some share one" if len(groups) < jobs_at_once else ""
        line = (
            f"{visible.text}: each job gets {gpus} GPU{'s' * (gpus != 1)} (CUDA_VISIBLE_DEVICES) and runs "
            f"{ranks}, {at_once}{shared}"
        )
    return LocalPlan(resolved, groups, jobs_at_once, line, why_no_gpu)


def plan_launch(params: dict, jobs_at_once: int, settings: list, first_number: int) -> LocalPlan:
    """The LocalPlan of a launch of `settings` (jobs numbered from `first_number`), `jobs_at_once`
    of them running together, once the local launcher's checks passed; its line is said once per
    process (and again when it changes), with a warning for a GPU-sized job that gets no GPU."""
    plan = local_plan(params, jobs_at_once, site.visible_gpus())
    check_local(plan.params, settings)
    if checks.say_once(plan.line):
        log.info("hydra/launcher=local: %s", plan.line)
    checks.warn_about_cpu_jobs(plan.params.get("gpus_per_node") or 0, plan.why_no_gpu, settings, first_number)
    return plan


def check_local(params: dict, settings: list) -> None:
    """What the local launcher refuses before it starts a job (params with GPUs resolved: local_plan)."""
    checks.check_ranks(params, settings)
    if (params.get("nodes") or 1) != 1:
        raise LauncherError("hydra/launcher=local runs on this machine: hydra.launcher.nodes must be 1")


def local_threads(params: dict, jobs_at_once: int) -> int | None:
    """The thread count of each task of local jobs, `jobs_at_once` of them sharing this machine:
    hydra.launcher.threads_per_task, else this machine's cores / (jobs x tasks); None when the user
    set OMP_NUM_THREADS (the jobs inherit it)."""
    threads = params.get("threads_per_task")
    if threads is not None:
        return threads
    if "OMP_NUM_THREADS" in os.environ and not _SET_BY_US:
        return None
    tasks = params.get("tasks_per_node") or 1
    return max(1, len(os.sched_getaffinity(0)) // (jobs_at_once * tasks))


def share_cores(plan: LocalPlan) -> None:
    """Local jobs share this machine: give each task its share of the cores as its thread count
    (OMP_NUM_THREADS, which the jobs inherit), unless the user chose one. Without it every
    process starts one thread per core and they slow each other down several-fold."""
    threads = local_threads(plan.params, plan.jobs_at_once)
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        _SET_BY_US.add(str(threads))


def submit_local(executor, function, job_params: list, plan: LocalPlan, taken: list) -> list:
    """Submit each job (`function(*params)`) on a local executor with a GPU set of its own
    (take_gpus, appended to `taken` for the caller to give back). All start, or, when one cannot,
    those already started are stopped and the error raised."""
    jobs: list = []
    try:
        for params in job_params:
            taken.append(take_gpus(plan))
            submitit_adapter.set_visible_gpus(executor, taken[-1])
            jobs.append(executor.submit(function, *params))
    except BaseException:
        for job in jobs:
            job.cancel(check=False)
        raise
    return jobs


def take_gpus(plan: LocalPlan) -> tuple:
    """The GPU set of `plan` that the fewest running local jobs hold, now held once more."""
    with _GPU_LOCK:
        group = min(plan.groups, key=lambda ids: _GPU_USE.get(ids, 0))
        _GPU_USE[group] = _GPU_USE.get(group, 0) + 1
    return group


def release_gpus(groups: list) -> None:
    with _GPU_LOCK:
        for group in groups:
            _GPU_USE[group] -= 1


def quiet_controllers(executor) -> None:
    """Each local job's controller becomes launching/controller.py, quiet on Ctrl-C, instead of
    submitit's (which prints a KeyboardInterrupt traceback on the sweeper's terminal and SIGKILLs
    its tasks a second later). Its environment is submitit's (submitit.local.local.start_controller)."""
    submitit_adapter.replace_local_command(executor, _start_controller)


def _start_controller(local_executor, command: str):
    from submitit.local.local import LocalJob

    parameters = local_executor.parameters
    tasks = parameters.get("tasks_per_node", 1)
    gpus = parameters.get("visible_gpus", ()) or range(parameters.get("gpus_per_node", 0))
    env = {
        **os.environ,
        "SUBMITIT_LOCAL_NTASKS": str(tasks),
        "SUBMITIT_LOCAL_COMMAND": command,
        "SUBMITIT_LOCAL_TIMEOUT_S": str(int(60 * parameters.get("timeout_min", 2.0))),
        "SUBMITIT_LOCAL_SIGNAL_DELAY_S": str(int(parameters.get("signal_delay_s", 30))),
        "SUBMITIT_LOCAL_NODEID": "0",
        "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
        "SUBMITIT_STDERR_TO_STDOUT": "1" if parameters.get("stderr_to_stdout", False) else "",
        "SUBMITIT_EXECUTOR": "local",
        "CUDA_VISIBLE_DEVICES": ",".join(str(gpu) for gpu in list(gpus)[: parameters.get("gpus_per_node", 0)]),
        "SUBMITIT_LOCAL_WITH_SHELL": "",
    }
    controller = [sys.executable, "-m", "launching.controller", str(local_executor.folder)]
    process = subprocess.Popen(controller, env=env)
    return LocalJob(folder=local_executor.folder, job_id=str(process.pid), process=process, tasks=list(range(tasks)))
