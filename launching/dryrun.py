"""`python launch.py -m <overrides> hydra.launcher.dry_run=true`: what a multirun would submit,
without submitting anything.

Every job is composed and checked as the launch would (launching.jobs.check_launch, then the
launcher's own checks). With hydra/launcher=slurm each submission's sbatch script is printed as
submitit would write it (the launcher's code path, make_executor), followed by SLURM's verdict on
it from `sbatch --test-only`, which creates no job; then the launcher's check of the request
against the partition. Under our Optuna sweeper each trial is a submission of its own; under
Hydra's basic sweeper a batch of jobs is one job array. With hydra/launcher=local the jobs are
listed with how they would share this machine.

Nothing is written: no sweep directory, no .submitit folder, no MLflow run, no Optuna study.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from launching import jobs, slurm
from launching.adapters.hydra import parse_launch_arguments
from soda.progress import plural

FLAG = "hydra.launcher.dry_run"


def main(arguments: Sequence[str]) -> int | None:
    """The dry run of `python launch.py <arguments>`: its exit status (0 when SLURM would accept
    every job, 2 with an `error:` line otherwise), or None when the arguments ask for none and the
    launch goes on. Composition and check errors are raised, as the launch raises them."""
    args = parse_launch_arguments(arguments)
    if args.cfg or args.help or args.hydra_help or args.info or args.shell_completion:
        return None  # those print instead of launching
    # Read as the launcher reads it (launching.jobs.parse_flag), so that a value the launcher takes for
    # true (1, on, ...) is a dry run here too, never a launch whose every job the launcher refuses.
    asked = jobs.command_line_flag(arguments, FLAG)
    if asked is None and args.multirun:
        asked = _set_by_a_config_file(arguments, list(args.overrides))
    if not asked:
        return None
    # The launchers' warnings (a file store on a cluster, say): as one line each, the way a launch
    # shows them, not through Python's bare fallback handler.
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    if not args.multirun:
        return _error(
            "hydra.launcher.dry_run=true needs -m: a single run runs here, in-process, not through a launcher"
        )
    return _dry_run(list(arguments), list(args.overrides))


def _set_by_a_config_file(arguments: list[str], overrides: list[str]) -> bool:
    """Whether the launch's composition (a launcher option, the site profile) sets the flag: the
    launcher would read it and refuse every job after the sweeper has begun its study. A
    composition that fails is the launch's to report, as it always does."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        launch = jobs.compose_as_launched(arguments, jobs.plain_overrides(overrides))
    except (HydraException, OmegaConfBaseException):
        return False
    return jobs.parse_flag(FLAG, OmegaConf.select(launch, FLAG, default=False))


def _dry_run(arguments: list[str], overrides: list[str]) -> int:
    from omegaconf import OmegaConf

    from launching import submission

    overrides_of_jobs = jobs.check_launch(arguments)
    # The launcher's settings are the launch's, not a job's: Hydra makes one launcher for the sweep,
    # from the command line's plain overrides, with launch.py's job name.
    launch = jobs.compose_as_launched(arguments, [*jobs.plain_overrides(overrides), "hydra.job.name=launch"])
    params = OmegaConf.to_container(launch.hydra.launcher, resolve=True)
    target = str(params.pop("_target_", ""))
    settings = [jobs.job_settings(jobs.compose_as_launched(arguments, job)) for job in overrides_of_jobs]
    trials_on_their_own = submission.sweeper_runs_trials(launch)
    shown = submission.shown_overrides(overrides_of_jobs)

    if trials_on_their_own:  # our Optuna sweeper: one launch, so one submission, per trial; sweep.n_jobs in flight
        plan = _optuna_plan(launch, overrides, overrides_of_jobs, shown)
        at_once = settings[0].sweep.n_jobs
    else:  # Hydra's basic sweeper: its batches (all jobs, unless max_batch_size) are launched at once
        count = len(overrides_of_jobs)
        size = OmegaConf.select(launch, "hydra.sweeper.max_batch_size", default=None) or count
        batches = [list(range(start, min(start + size, count))) for start in range(0, count, size)]
        plan = Plan(f"dry run of {plural(count, 'trial')}", count, list(enumerate(shown)), batches, [])
        at_once = size
    print(f"{plan.title}: python launch.py {' '.join(arguments)}")
    for line in plan.notes:
        print(line)
    if target.endswith("SodaLocalLauncher"):
        return _local(params, settings, plan, min(at_once, plan.trials))
    if target.endswith("SodaSlurmLauncher"):
        return _slurm(params, settings, plan, trials_on_their_own)
    return _error(f"hydra.launcher.dry_run=true needs hydra/launcher=local or slurm, not {target}")


@dataclass
class Plan:
    """What a multirun would run: a title, how many trials, the rows to list ((number, overrides);
    number None for a trial the sampler has not chosen yet), how they are submitted (lists of
    row indices, one per submission) and lines saying more."""

    title: str
    trials: int
    rows: list[tuple[int | None, str]]
    submissions: list[list[int]]
    notes: list[str]


def _optuna_plan(launch, overrides: list[str], jobs: list[list[str]], shown: list[str]) -> Plan:
    """The trials of our Optuna sweeper as it will run them: a grid's cells (the first
    sweep.n_trials of them), or a sampler's number of trials and the ranges it draws from."""
    from omegaconf import OmegaConf

    from launching.sweeper.sampler import sampler_spec
    from launching.sweeper.search_space import parse_space

    sweeper = OmegaConf.to_container(launch.hydra.sweeper, resolve=True)
    choices = OmegaConf.select(launch, "hydra.runtime.choices", default={}) or {}
    spec = sampler_spec(sweeper.get("sampler"), choices.get("hydra/sweeper/sampler"))
    n_trials, n_jobs = sweeper.get("n_trials"), sweeper.get("n_jobs")
    study = f"study {sweeper.get('study_name')}" if sweeper.get("study_name") else "a new study"
    resume = f"{study}: trials it already finished are not run again"
    if spec.grid:
        count = min(n_trials or len(jobs), len(jobs))
        cut = f", the first {count} (sweep.n_trials={n_trials})" if count < len(jobs) else ""
        title = f"dry run of a grid of {plural(len(jobs), 'cell')}{cut}: {plural(count, 'trial')}, {n_jobs} at a time"
        rows = list(enumerate(shown[:count]))
        return Plan(title, count, rows, [[n] for n in range(count)], [resume])
    dimensions, _ = parse_space(sweeper.get("params") or {}, overrides)
    title = f"dry run of a {spec.name} search: {plural(n_trials or 0, 'trial')}, {n_jobs} at a time"
    notes = [f"  {name}: {dimension.spec}" for name, dimension in dimensions.items()]
    notes.append(
        f"{resume}; the sampler picks each trial's values when it starts; all {plural(len(jobs), 'composition')} "
        "of the choices and the intervals' low ends were checked"
    )
    return Plan(title, n_trials or 0, [(None, f"{spec.name} picks {', '.join(dimensions)}")], [[0]], notes)


def _local(params: dict, settings: list, plan: Plan, at_once: int) -> int:
    from launching import checks, local, site

    gpus = local.local_plan(params, at_once, site.visible_gpus())
    local.check_local(gpus.params, settings)
    checks.warn_about_cpu_jobs(gpus.params["gpus_per_node"], gpus.why_no_gpu, settings)
    for number, overrides in plan.rows:
        print(f"--- {_trial(number, plan.trials)}: {overrides}")
    threads = local.local_threads(gpus.params, at_once)
    threads_text = "the OMP_NUM_THREADS you set" if threads is None else f"{threads} thread{'s' * (threads != 1)}"
    print(f"{gpus.line}; each rank with {threads_text} (OMP_NUM_THREADS)")
    print(
        f"dry run: {plural(plan.trials, 'trial')} would run on this machine (hydra/launcher=local); nothing was started"
    )
    return 0


def _trial(number: int | None, total: int) -> str:
    return f"trial {number} of {total}" if number is not None else f"each of the {total} trials"


def _slurm(params: dict, settings: list, plan: Plan, optuna_sweep: bool) -> int:
    from launching import checks, submission

    checks.check_slurm(params, settings)
    for job in settings:
        checks.warn_about_file_stores(job.tracking.uri, job.sweep.storage, optuna_sweep=optuna_sweep)
    gpus = params.get("gpus_per_node")
    checks.warn_about_cpu_jobs(gpus or 0, f"hydra.launcher.gpus_per_node={gpus}", settings)
    executor = submission.make_executor("slurm", params)
    total = plan.trials
    # One row stands for every trial when the sampler has not chosen them: its verdict is theirs.
    weight = total if plan.rows and plan.rows[0][0] is None else 1
    refused: list[tuple[int, str]] = []  # (trials, sbatch's first line) of each refused submission
    for indices in plan.submissions:
        for index in indices:
            number, overrides = plan.rows[index]
            print(f"--- {_trial(number, total)}: {overrides}")
        if len(indices) > 1:
            first, last = plan.rows[indices[0]][0], plan.rows[indices[-1]][0]
            print(f"--- one job array of jobs {first}-{last}, as Hydra's basic sweeper submits them:")
        script = submission.submission_script(executor, len(indices))
        print(script.rstrip("\n"))
        accepted, answer = _test_only(script)
        print(f"sbatch --test-only {'accepted' if accepted else 'refused'} it: {'; '.join(answer)}")
        if not accepted:
            refused.append((len(indices) * weight, answer[0]))
    problem = slurm.partition_check(params)
    print(f"the launcher's check of the request against the partition: {problem or 'passed'}")
    refused_trials = sum(count for count, _ in refused)
    submissions = total if weight > 1 else len(plan.submissions)
    print(
        f"dry run: sbatch --test-only accepted {total - refused_trials} of {plural(total, 'trial')} in "
        f"{plural(submissions, 'submission')}; nothing was submitted"
    )
    if refused:
        return _error(f"dry run: sbatch --test-only refused {refused_trials} of {total} trials: {refused[0][1]}")
    if problem is not None:
        return _error(f"dry run: the launch would refuse the jobs: {problem}")
    return 0


def _test_only(script: str) -> tuple[bool, list[str]]:
    """Whether SLURM would accept the sbatch script, and its answer's lines; submits nothing."""
    answer = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60)
    lines = [line.strip() for line in (answer.stderr + answer.stdout).splitlines() if line.strip()]
    return answer.returncode == 0, lines or [f"sbatch exited with status {answer.returncode}"]


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
