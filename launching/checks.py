"""What the launchers refuse before anything is submitted, each in one line (LauncherError), and
the warnings they give once per process."""

from __future__ import annotations

import logging
import shutil

from soda.errors import SodaError

log = logging.getLogger(__name__)
_WARNED: set = set()  # warnings given once per process


class LauncherError(SodaError):
    pass


def refuse_a_dry_run(params: dict) -> None:
    """A launcher never submits with dry_run set: launch.py shows a dry run before any launch. The
    value is read by the rule launch.py reads it by (launching.jobs.parse_flag)."""
    from launching.jobs import parse_flag

    if parse_flag("hydra.launcher.dry_run", params.get("dry_run", False)):
        raise LauncherError(
            "hydra.launcher.dry_run is true, so this launcher submits nothing; for a dry run, give it on a "
            "multirun's command line: python launch.py -m ... hydra.launcher.dry_run=true"
        )


def check_ranks(params: dict, settings: list) -> None:
    """Whole numbers of tasks, nodes, GPUs and minutes; one rank per GPU; a batch every job's
    ranks can share."""
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
    for batch in sorted({job.schedule.batch_size for job in settings}):
        if batch % world:
            raise LauncherError(
                f"schedule.batch_size={batch} is not divisible by the {world} ranks of each job (nodes x "
                f"tasks_per_node); choose a multiple of {world}"
            )


def check_slurm(params: dict, settings: list) -> None:
    """What the SLURM launcher refuses before it submits, but for the partition (slurm.partition_check)."""
    check_ranks(params, settings)
    if shutil.which("sbatch") is None:
        raise LauncherError("hydra/launcher=slurm needs SLURM's sbatch on PATH; run on a cluster login node")


def check_slurm_launch(params: dict, settings: list, optuna_sweep: bool, first_number: int) -> None:
    """What the SLURM launcher refuses before it submits `settings` (jobs numbered from
    `first_number`), the partition included, and the warnings it gives once per process."""
    from launching import slurm

    check_slurm(params, settings)
    problem = slurm.partition_check(params)
    if problem is not None:
        raise LauncherError(problem)
    for job in settings:
        warn_about_file_stores(job.tracking.uri, job.sweep.storage, optuna_sweep=optuna_sweep)
    gpus = params.get("gpus_per_node")
    warn_about_cpu_jobs(gpus or 0, f"hydra.launcher.gpus_per_node={gpus}", settings, first_number)


def say_once(line: str) -> bool:
    """True the first time `line` is asked about in this process (and again after it changes)."""
    if line in _WARNED:
        return False
    _WARNED.add(line)
    return True


def warn_about_cpu_jobs(gpus: int, why: str, settings: list, first_number: int = 0) -> None:
    """Once per process, a warning line when a job that needs GPUs (soda.config.gpu_sized) gets none."""
    from soda.config import gpu_sized

    for number, job in enumerate(settings, start=first_number):
        size = gpu_sized(job)
        if gpus or size is None or "cpu jobs" in _WARNED:
            continue
        _WARNED.add("cpu jobs")
        log.warning(
            "job #%d trains %s but gets no GPU (%s): on CPUs that takes days; give it GPUs "
            "(hydra.launcher.gpus_per_node) or a smaller run (experiment=demo)",
            number,
            size,
            why,
        )


def warn_about_file_stores(tracking_uri: str, sweep_storage: str, optuna_sweep: bool) -> None:
    """Once per process, a warning line when the jobs would write to a store that is one file on
    the (shared) file system: jobs on several nodes then contend for it through file locks."""
    problems = []
    if str(tracking_uri).startswith("sqlite:"):
        problems.append(
            f"tracking.uri={tracking_uri} is an SQLite file, whose locks are unreliable on network file systems "
            "(jobs writing at once fail with 'database is locked'): use an MLflow server, tracking=server "
            "(scripts/mlflow-server.sh)"
        )
    storage = str(sweep_storage)
    if optuna_sweep and ("://" not in storage or storage.startswith("sqlite:")):
        kind = "an SQLite file" if storage.startswith("sqlite:") else "an Optuna journal file"
        problems.append(
            f"sweep.storage={storage} is {kind} that every trial writes through lock files on the shared file "
            "system (slow with many trials, safe only where the locks hold, NFSv3 or later): use a database, "
            "sweep.storage=postgresql://..."
        )
    if problems and "file stores" not in _WARNED:
        _WARNED.add("file stores")
        log.warning("hydra/launcher=slurm: %s", "; ".join(problems))
