"""Hydra launchers for SODA jobs: hydra-submitit-launcher's, plus checks that turn a bad job
(a config that does not validate, tasks that do not match GPUs, a batch the ranks cannot share,
an unknown partition or a request it cannot satisfy) into one line before anything is submitted,
`srun --kill-on-bad-exit` so one failed rank ends the job, and a one-line report naming the rank
that failed first when a job dies.

Each SLURM job first checks, on its node, that its Python (hydra.launcher.python, else the one
that submitted it) exists and imports the project (preflight_line); when it does not, the job
ends with one line saying so, and that line is the launch's error. `hydra.launcher.dry_run=true`
on the command line shows what would be submitted instead (launching/dryrun.py); a launcher given it
submits nothing.

Select with `hydra/launcher=local` or `hydra/launcher=slurm` (conf/hydra/launcher/); `local` is
the default for multiruns, so every job is its own process.

Jobs in flight are kept in a registry (inflight.py) while `launch` waits for them, so that a
sweeper that is interrupted can cancel them instead of leaving them running on the cluster.

While it waits, `launch` says how each job ended as it ends (finished with its final metrics,
failed with its error's first line, or stopped; and its log), then counts them in one line. Not
under our Optuna sweeper: it says how each trial ended itself, and a trial whose job died names
the failing rank's log there (the LauncherError below).

No `from __future__ import annotations` here: Hydra's plugin scan executes this module without
registering it in sys.modules, and dataclasses cannot resolve string annotations then.
"""

import copy
import logging
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence  # OmegaConf needs typing's generics

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import OmegaConf

from launching import site, slurm
from soda import progress
from soda.errors import SodaError
from soda.tracking import redact

log = logging.getLogger(__name__)
_SET_BY_US: set = set()  # OMP_NUM_THREADS values this module set (so it may set them again)
_EXECUTOR_INIT_KEYS = ("submitit_folder", "max_num_timeout", "python")
_OUR_KEYS = ("threads_per_task", "dry_run")  # handled here, not by submitit
# What a SLURM job's preflight line prints when it fails, first (the launcher finds it in the job's log).
PREFLIGHT = "soda preflight"
# What a job imports as it unpickles the launcher and runs the task (the project, submitit, this package).
PREFLIGHT_IMPORTS = "soda, submitit, hydra_plugins.soda_launchers"
_WARNED: set = set()  # warnings given once per process (warn_about_file_stores)
POLL_S = 1.0  # how often `launch` looks for jobs that ended
# How a job that handed back no result was stopped from outside (Ctrl-C, SIGTERM, a preemption's
# exit, a cancel), by the exception line of its log or by its scheduler state.
_STOPPED_LINE = re.compile(r"^(KeyboardInterrupt|(soda\.errors\.)?Terminated|SystemExit: preempted)\b")
_STOPPED_STATES = ("CANCELLED", "INTERRUPTED", "PREEMPTED", "NODE_FAIL", "DEADLINE")
# A SLURM job in one of these states has ended (its result file, if any, is written).
_ENDED_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
SCONTROL_EVERY_S = 10.0  # how often `launch` asks scontrol about a SLURM job submitit has not seen end


class LauncherError(SodaError):
    pass


def _sacct_warning_once(record: logging.LogRecord) -> bool:
    """submitit warns at every status poll when sacct fails (a cluster without accounting); say it once."""
    if "Bypassing sacct error" not in record.getMessage():
        return True
    # One record kept, however often this module is loaded (Hydra's plugin scan, an import) and so
    # however many copies of this filter the logger holds.
    said = logging.getLogger("submitit").__dict__.setdefault("_soda_said", {})
    return said.setdefault("sacct", id(record)) == id(record)


if _sacct_warning_once not in logging.getLogger("submitit").filters:
    logging.getLogger("submitit").addFilter(_sacct_warning_once)


class _TrackedLaunch:
    """hydra-submitit-launcher's launch, written against submitit's public API, keeping the
    submitted jobs in the registry while it waits for them. Safe to call from several threads
    (a sweeper keeping several trials in flight): each call has its own executor."""

    _EXECUTOR: str
    params: dict

    def _job_settings(self, job_overrides) -> list:
        """Each job's config, composed and validated here as the job would (soda.config.to_settings),
        so that an unknown key or a bad value in any job stops the launch before anything runs."""
        from launching import inflight
        from soda.config import to_settings

        settings = []
        with inflight.SUBMIT_LOCK:  # Hydra's config loader is shared by a sweeper's threads
            for overrides in job_overrides:
                composed = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                settings.append(to_settings(OmegaConf.masked_copy(composed, [k for k in composed if k != "hydra"])))
        return settings

    def _submit_and_wait(self, job_overrides, initial_job_idx):
        from launching import inflight

        local = self._EXECUTOR == "local"
        plan = self._plan(len(job_overrides)) if local else None
        executor = make_executor(self._EXECUTOR, plan.params if local else self.params)
        if local:
            _quiet_controllers(executor)
            self._share_cores(plan)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        job_params = []
        for offset, overrides in enumerate(job_overrides):
            number = initial_job_idx + offset
            log.info("\t#%d : %s", number, " ".join(redact(o) for o in filter_overrides(overrides)))
            job_params.append(
                (list(overrides), "hydra.sweep.dir", number, f"job_id_for_{number}", Singleton.get_state())
            )
        jobs: list = []
        taken: list = []  # the GPU sets the local jobs hold, given back however the launch ends
        try:
            with inflight.SUBMIT_LOCK:
                if local:  # one job at a time, each with its own GPUs (map_array gives all the same)
                    jobs = submit_local(executor, self, job_params, plan, taken)
                else:
                    jobs = executor.map_array(self, *zip(*job_params, strict=True))
                inflight.add(jobs, [params[2] for params in job_params])
            return self._wait(jobs, job_overrides, initial_job_idx, sweep_dir)
        finally:
            inflight.remove(jobs)
            release_gpus(taken)

    def _wait(self, jobs, job_overrides, initial_job_idx: int, sweep_dir: Path) -> list:
        """Each job's JobReturn, once every job ended, with a line on each job as it ends and a
        count at the end (the module's docstring); LauncherError, with the first job that handed
        back no result, when there is one."""
        from submitit.core.utils import FailedJobError, UncompletedJobError

        sweeper = str(OmegaConf.select(self.config, "hydra.sweeper._target_", default=""))
        quiet = "soda_sweeper" in sweeper  # the sweeper says how each trial ended
        shown = _shown_overrides(job_overrides)
        started = time.monotonic()
        results, endings, failures = [None] * len(jobs), [], []
        waiting = dict(enumerate(jobs))
        asked: dict = {}  # job index -> when scontrol was last asked about it
        seen_ended: dict = {}  # job index -> whether scontrol said it ended at the last look
        while waiting:
            for index, job in list(waiting.items()):
                done = job.done()
                # A job its preflight stopped ended, whatever the scheduler says (sacct lags, or
                # answers nothing on a cluster without accounting: submitit would wait forever).
                preflight = None if done else _preflight_failure(job)
                if not done and preflight is None:
                    # submitit sees a job end by its result file, or by sacct: one that ended without
                    # a result (cancelled, killed) on a cluster whose sacct does not answer would be
                    # waited for forever. Ask scontrol now and then.
                    if time.monotonic() - asked.get(index, started) < SCONTROL_EVERY_S:
                        continue
                    asked[index] = time.monotonic()
                    ended_before, seen_ended[index] = seen_ended.get(index, False), _ended_per_scontrol(job) is not None
                    # Ended at two looks in a row: a result file written at the end has had
                    # SCONTROL_EVERY_S to appear on this host (network file systems lag).
                    if not (ended_before and seen_ended[index]):
                        continue
                del waiting[index]
                if preflight is not None:
                    failures.append(f"job {job.job_id}: {preflight[0]}")
                    ended = None if quiet else ("failed", *preflight)
                else:
                    try:
                        if not done:  # scontrol saw it end; submitit's results() would wait on
                            state = job._soda_final_state
                            raise UncompletedJobError(f"job {job.job_id} ended ({state}) without a result")
                        results[index] = job.results()[0]
                        ended = None if quiet else _ending(job, results[index])
                    except (FailedJobError, UncompletedJobError) as error:
                        # submitit's message quotes task 0's streams, often empty when another rank failed.
                        failures.append(_job_failure(job, error))
                        ended = None if quiet else _crash(job, error)
                if ended is not None:
                    ending, detail, log_path = ended
                    endings.append(ending)
                    took = progress.duration(time.monotonic() - started)
                    log.info(
                        "\t#%d %s: %s after %s: %s; log: %s",
                        initial_job_idx + index,
                        shown[index],
                        ending,
                        took,
                        detail,
                        log_path,
                    )
            if waiting:
                time.sleep(POLL_S)
        if not quiet:
            counts = ", ".join(f"{endings.count(e)} {e}" for e in ("finished", "failed", "stopped") if e in endings)
            log.info("%s: %s; sweep dir %s", progress.plural(len(jobs), "job"), counts, sweep_dir)
        if failures:
            raise LauncherError(failures[0])
        return results


def make_executor(kind: str, params: dict):
    """submitit's executor (kind "local" or "slurm") with the launcher's settings (hydra.launcher.*,
    resolved): what a launch submits through, and what the dry run asks for the scripts it would
    submit. A SLURM job runs the preflight line after the `setup` lines. Creates nothing on disk."""
    import submitit

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
        settings["slurm_setup"] = [*(params.get("setup") or []), preflight_line(executor._executor.python)]
    executor.update_parameters(**settings)
    return executor


def preflight_line(python: str) -> str:
    """The shell line a SLURM job runs before srun: `python` (a shell command, as submitit runs it)
    must be found and import the project, else the job prints one line (PREFLIGHT, the node, the
    interpreter as `command -v` finds it, what failed, what to do) to stderr and exits 1. Without it
    a job whose node lacks the environment ends with submitit's 'has not produced any output'."""
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
        f'echo "{PREFLIGHT} on $(hostname): the job\'s Python $soda_problem; {advice}" >&2; exit 1; fi'
    )


def submission_script(executor, jobs: int) -> str:
    """The sbatch script a SLURM executor submits for `jobs` jobs at once: one plain job, or one job
    array (as submitit's SlurmExecutor submits a map_array of several)."""
    slurm = copy.copy(executor._executor)
    if jobs > 1:
        slurm.parameters = {**slurm.parameters, "map_count": jobs}
    return slurm._make_submission_file_text(slurm._submitit_command_str, "dry-run")


def refuse_a_dry_run(params: dict) -> None:
    """A launcher never submits with dry_run set: launch.py shows a dry run before any launch. The
    value is read by the rule launch.py reads it by (soda.config.parse_flag)."""
    from soda.config import parse_flag

    if parse_flag("hydra.launcher.dry_run", params.get("dry_run", False)):
        raise LauncherError(
            "hydra.launcher.dry_run is true, so this launcher submits nothing; for a dry run, give it on a "
            "multirun's command line: python launch.py -m ... hydra.launcher.dry_run=true"
        )


def _shown_overrides(job_overrides) -> list:
    """Each job's overrides as its line shows them: those that differ between the jobs of the
    launch (`seed=1`), or all of them when none does."""
    jobs = [[redact(o) for o in filter_overrides(overrides)] for overrides in job_overrides]
    common = set.intersection(*map(set, jobs)) if len(jobs) > 1 else set()
    return [" ".join(o for o in overrides if o not in common) or " ".join(overrides) for overrides in jobs]


def _ending(job, result) -> tuple:
    """("finished" | "failed", what it ended with, its log) for a job that handed back its
    JobReturn: a finished run's objective and k-NN / linear accuracy (from its result file,
    soda.progress), or the error's first line."""
    from hydra.core.utils import JobStatus

    from soda.errors import first_line

    log_path = job.task(0).paths.stdout
    if result.status != JobStatus.COMPLETED:
        error = result._return_value  # the public return_value re-raises it and writes to stderr
        return "failed", f"{type(error).__name__}: {first_line(error)}", log_path
    output_dir = OmegaConf.select(result.hydra_cfg, "hydra.runtime.output_dir") if result.hydra_cfg else None
    final = progress.read_result(Path(str(output_dir))) if output_dir else None
    if final is None:
        return "finished", f"returned {result._return_value!r}", log_path
    metrics, objective = final.get("metrics", {}), final.get("objective", {})
    shown = [f"objective {name}={value:.4f}" for name, value in objective.items()]
    shown += [
        f"{name}={metrics[name]:.4f}"
        for name in ("eval/knn_acc", "eval/linear_acc")
        if name in metrics and name not in objective
    ]
    return "finished", f"epoch {final.get('epoch')}, " + ", ".join(shown), log_path


def _crash(job, error: Exception) -> tuple:
    """("failed" | "stopped", the exception line of the rank that failed first, that rank's log)
    for a job that handed back no result (or its preflight line, when that stopped it)."""
    preflight = _preflight_failure(job)
    if preflight is not None:
        return "failed", *preflight
    tasks = [job.task(number) for number in range(job.num_tasks)]
    failure = _first_failure([[task.paths.stderr, task.paths.stdout] for task in tasks])
    if failure is not None:
        who, _, _, line, log_path = failure
        line = line if len(tasks) == 1 else f"{line} ({who})"
    else:
        line, log_path = (str(error).strip().splitlines() or [type(error).__name__])[0], tasks[0].paths.stdout
    state = getattr(job, "_soda_final_state", None)  # scontrol's, when sacct could not tell
    if state is None:
        try:
            state = str(job.state).split()[0].upper()
        except Exception:  # a scheduler that cannot be asked now: the log decides
            state = ""
    stopped = bool(_STOPPED_LINE.search(line)) or state in _STOPPED_STATES
    return ("stopped" if stopped else "failed"), line, log_path


def _quiet_controllers(executor) -> None:
    """Each local job's controller becomes controller.py, quiet on Ctrl-C, instead of submitit's
    (which prints a KeyboardInterrupt traceback on the sweeper's terminal and SIGKILLs its tasks
    a second later). Its environment is submitit's (submitit.local.local.start_controller)."""
    import sys
    import types

    from submitit.local.local import LocalJob

    local = executor._executor  # AutoExecutor's LocalExecutor

    def submit_command(self, command):
        parameters = self.parameters
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
        controller = [sys.executable, "-m", "launching.controller", str(self.folder)]
        process = subprocess.Popen(controller, env=env)
        return LocalJob(folder=self.folder, job_id=str(process.pid), process=process, tasks=list(range(tasks)))

    local._submit_command = types.MethodType(submit_command, local)


def _job_failure(job, error: Exception) -> str:
    """One line on a job that ended without a result: its preflight line when that stopped it, else
    the rank that failed first and its log."""
    preflight = _preflight_failure(job)
    if preflight is not None:
        return f"job {job.job_id}: {preflight[0]}"
    tasks = [job.task(number) for number in range(job.num_tasks)]
    story = rank_failure([[task.paths.stderr, task.paths.stdout] for task in tasks])
    if story is not None:
        return story if len(tasks) > 1 else story.replace("rank 0 failed", f"job {job.job_id} failed", 1)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"job {job.job_id} ended without a result and no rank logged an error ({first}); logs: {job.paths.folder}"


def _ended_per_scontrol(job) -> Optional[str]:
    """A SLURM job's final state as scontrol shows it (kept as job._soda_final_state), or None
    while it has not ended, for a local job, or when scontrol cannot tell. A job the controller
    has already forgotten (MinJobAge) has ended: "ENDED"."""
    from submitit.slurm.slurm import SlurmJob

    if not isinstance(job, SlurmJob):
        return None
    try:
        shown = subprocess.run(
            ["scontrol", "show", "job", str(job.job_id), "--oneliner"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if shown.returncode != 0:
        state = "ENDED" if "Invalid job id" in shown.stderr else None
    else:
        found = re.search(r"\bJobState=(\w+)", shown.stdout)
        state = found[1] if found and found[1] in _ENDED_STATES else None
    if state is not None:
        job._soda_final_state = state
    return state


def _preflight_failure(job) -> Optional[tuple]:
    """(the preflight line, the log holding it) when the job's batch script stopped there, or None.
    The batch script writes to task 0's logs, and its last line is then the preflight's; only the
    end of each log is read, as this runs for every waiting job at each poll."""
    task = job.task(0)
    for path in (task.paths.stderr, task.paths.stdout):
        try:
            with open(path, "rb") as log_file:
                log_file.seek(max(0, log_file.seek(0, os.SEEK_END) - 4096))
                lines = log_file.read().decode(errors="replace").splitlines()
        except OSError:
            continue
        if lines and lines[-1].startswith(PREFLIGHT):
            return lines[-1].strip(), path
    return None


# A rank's error that only says another rank went away (its socket closed, a collective timed out).
_PEER_ERROR = re.compile(
    r"Connection (reset|closed) by peer|Broken pipe|Socket Timeout|DistNetworkError|collective operation timeout"
    r"|NCCL communicator was aborted"
)
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[,.]\d+)?")


def rank_failure(task_logs: Sequence[Sequence[Path]]) -> Optional[str]:
    """`rank <r> failed: <its exception line>; full log: <file>` from each rank's log files
    (`task_logs[rank]`: submitit's .err and .out of that task), or None when no rank logged a
    traceback. When one rank dies the others often fail too, on a socket their peer closed: the
    rank blamed is the one whose error is not such a consequence, and the earliest logged."""
    failure = _first_failure(task_logs)
    if failure is None:
        return None
    who, _, _, line, path = failure
    return f"{who} failed: {line}; full log: {path}"


def _first_failure(task_logs: Sequence[Sequence[Path]]) -> Optional[tuple]:
    """(`rank <r>` or `ranks <r>, <s>`, when, rank, exception line, file) of the rank to blame
    (rank_failure), or None when no rank logged a traceback."""
    failures = []  # (is a peer's consequence, when, rank, exception line, file)
    for rank, paths in enumerate(task_logs):
        for path in paths:
            found = _last_exception(path)
            if found is not None:
                when, line = found
                failures.append((bool(_PEER_ERROR.search(line)), when, rank, line[:300], path))
                break
    if not failures:
        return None
    failures.sort(key=lambda failure: (failure[0], failure[1] or "~", failure[2]))
    _, when, first_rank, line, path = failures[0]
    alike = sorted({failure[2] for failure in failures if failure[3] == line} | {first_rank})
    who = f"rank {first_rank}" if len(alike) == 1 else f"ranks {', '.join(map(str, alike))}"
    return who, when, first_rank, line, path


def _last_exception(path: Path) -> Optional[tuple]:
    """(the timestamp logged just before it or None, the exception line) of the last traceback
    in a log file, or None when it holds none."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    starts = [n for n, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if not starts:
        return None
    start = starts[-1]
    # The frames are indented; the first line that is not is the exception (a chained traceback's
    # last one is the exception that ended the program).
    line = next((text for text in lines[start + 1 :] if text.strip() and not text[0].isspace()), None)
    if line is None:
        return None
    stamp = _TIMESTAMP.search(lines[start - 1]) if start > 0 else None
    return (stamp[0].replace("T", " ").replace(".", ",") if stamp else None), line.strip()


def _check_ranks(params: dict, settings: list) -> None:
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


class SodaLocalLauncher(_TrackedLaunch, LocalLauncher):
    jobs_at_once: int | None = None  # set by a sweeper that keeps several launch() calls in flight

    def _plan(self, jobs_in_this_call: int) -> "LocalPlan":
        return local_plan(self.params, max(self.jobs_at_once or 1, jobs_in_this_call), site.visible_gpus())

    def _share_cores(self, plan: "LocalPlan") -> None:
        """Local jobs share this machine: give each task its share of the cores as its thread
        count (OMP_NUM_THREADS, which the jobs inherit), unless the user chose one. Without it
        every process starts one thread per core and they slow each other down several-fold."""
        threads = local_threads(plan.params, plan.jobs_at_once)
        if threads is not None:
            os.environ["OMP_NUM_THREADS"] = str(threads)
            _SET_BY_US.add(str(threads))

    def launch(self, job_overrides, initial_job_idx):
        refuse_a_dry_run(self.params)
        settings = self._job_settings(job_overrides)
        plan = self._plan(len(job_overrides))
        check_local(plan.params, settings)
        if plan.line not in _WARNED:  # said once per process, and again if it changes
            _WARNED.add(plan.line)
            log.info("hydra/launcher=local: %s", plan.line)
        warn_about_cpu_jobs(plan.params.get("gpus_per_node") or 0, plan.why_no_gpu, settings, initial_job_idx)
        return self._submit_and_wait(job_overrides, initial_job_idx)


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


def local_plan(params: dict, jobs_at_once: int, visible: "site.VisibleGPUs") -> LocalPlan:
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


_GPU_USE: dict = {}  # GPU set -> local jobs holding it now (a sweeper's threads launch at once)


def submit_local(executor, function, job_params: list, plan: LocalPlan, taken: list) -> list:
    """Submit each job (`function(*params)`) on a local executor with a GPU set of its own
    (take_gpus, appended to `taken` for the caller to give back). All start, or, when one cannot,
    those already started are stopped and the error raised."""
    jobs: list = []
    try:
        for params in job_params:
            taken.append(take_gpus(plan))
            # Set directly: submitit checks visible_gpus for ints, and CUDA also names GPUs by UUID.
            executor._executor.parameters["visible_gpus"] = taken[-1]
            jobs.append(executor.submit(function, *params))
    except BaseException:
        for job in jobs:
            job.cancel(check=False)
        raise
    return jobs


def take_gpus(plan: LocalPlan) -> tuple:
    """The GPU set of `plan` that the fewest running local jobs hold, now held once more."""
    from launching import inflight

    with inflight.GPU_LOCK:
        group = min(plan.groups, key=lambda ids: _GPU_USE.get(ids, 0))
        _GPU_USE[group] = _GPU_USE.get(group, 0) + 1
    return group


def release_gpus(groups: list) -> None:
    from launching import inflight

    with inflight.GPU_LOCK:
        for group in groups:
            _GPU_USE[group] -= 1


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


def local_threads(params: dict, jobs_at_once: int) -> Optional[int]:
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


def check_local(params: dict, settings: list) -> None:
    """What the local launcher refuses before it starts a job (params with GPUs resolved: local_plan)."""
    _check_ranks(params, settings)
    if (params.get("nodes") or 1) != 1:
        raise LauncherError("hydra/launcher=local runs on this machine: hydra.launcher.nodes must be 1")


def check_slurm(params: dict, settings: list) -> None:
    """What the SLURM launcher refuses before it submits, but for the partition (partition_check)."""
    _check_ranks(params, settings)
    if shutil.which("sbatch") is None:
        raise LauncherError("hydra/launcher=slurm needs SLURM's sbatch on PATH; run on a cluster login node")


class SodaSlurmLauncher(_TrackedLaunch, SlurmLauncher):
    def launch(self, job_overrides, initial_job_idx):
        refuse_a_dry_run(self.params)
        settings = self._job_settings(job_overrides)
        check_slurm(self.params, settings)
        problem = slurm.partition_check(self.params)
        if problem is not None:
            raise LauncherError(problem)
        sweeper = str(OmegaConf.select(self.config, "hydra.sweeper._target_", default=""))
        for job in settings:
            warn_about_file_stores(job.tracking.uri, job.sweep.storage, optuna_sweep="soda_sweeper" in sweeper)
        gpus = self.params.get("gpus_per_node")
        warn_about_cpu_jobs(gpus or 0, f"hydra.launcher.gpus_per_node={gpus}", settings, initial_job_idx)
        return self._submit_and_wait(job_overrides, initial_job_idx)


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
    # On the command line: show each job's sbatch script and SLURM's verdict, submit none (launching/dryrun.py).
    dry_run: bool = False


# The launchers' schemas, outside the hydra/launcher group so that they are not offered as its
# options: conf/hydra/launcher/{local,slurm}.yaml build on them (`/soda_schema_launcher_local@_here_`).
ConfigStore.instance().store(name="soda_schema_launcher_local", node=SodaLocalConf, provider="soda")
ConfigStore.instance().store(name="soda_schema_launcher_slurm", node=SodaSlurmConf, provider="soda")
