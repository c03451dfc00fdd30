"""The dry run (launching/dryrun.py): `python launch.py -m ... hydra.launcher.dry_run=true` shows each
job and, on SLURM, the sbatch script the launch would submit and SLURM's verdict on it (sbatch
--test-only); it submits nothing and writes nothing. A launcher given dry_run submits nothing."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hydra_plugins.soda_launchers import launchers
from launching import dryrun, submission
from launching.checks import LauncherError
from tests.helpers import launch
from tests.support.services import needs_slurm

PREFLIGHT = submission.preflight_line(shlex.quote(sys.executable))  # launch.py runs under this interpreter


def test_a_command_line_without_a_dry_run_goes_on_to_the_launch():
    assert dryrun.main(["-m", "seed=0,1"]) is None
    assert dryrun.main(["-m", "seed=0,1", "hydra.launcher.dry_run=false"]) is None
    assert dryrun.main(["-m", "seed=0,1", "hydra.launcher.dry_run=true", "--cfg", "job"]) is None  # it prints


def test_a_dry_run_needs_a_multirun(capsys):
    assert dryrun.main(["experiment=demo", "hydra.launcher.dry_run=true"]) == 2
    assert capsys.readouterr().err == (
        "error: hydra.launcher.dry_run=true needs -m: a single run runs here, in-process, not through a launcher\n"
    )


@pytest.mark.parametrize("launcher", [launchers.SodaLocalLauncher, launchers.SodaSlurmLauncher])
def test_a_launcher_given_dry_run_submits_nothing(tmp_path, launcher):
    folder = tmp_path / "sweep" / ".submitit" / "%j"
    with pytest.raises(LauncherError, match=r"^hydra.launcher.dry_run is true, so this launcher submits"):
        launcher(submitit_folder=str(folder), dry_run=True).launch([["seed=0"]], initial_job_idx=0)
    assert not any(tmp_path.iterdir())


@pytest.mark.integration
def test_a_launcher_option_that_sets_dry_run_makes_the_multirun_a_dry_run(tmp_path):
    # dry_run set by a config file, not the command line: the launcher would refuse every job (after
    # a sweeper had begun its study), so launch.py reads the composition and shows a dry run.
    options = tmp_path / "configs" / "hydra" / "launcher"
    options.mkdir(parents=True)
    (options / "local_dry.yaml").write_text("defaults:\n  - local\n\ndry_run: true\n")
    result = launch(
        ["-m", "experiment=demo", "seed=0,1", "hydra/launcher=local_dry", f"hydra.sweep.dir={tmp_path}/sweep"]
        + ["--config-dir", str(tmp_path / "configs")],
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == (
        "dry run: 2 trials would run on this machine (hydra/launcher=local); nothing was started"
    )
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("value", ["true", "True", "yes", "Y", "on", "ON", "1", "2", "false", "no", "n", "off", "0"])
def test_the_command_line_reads_the_flag_as_the_launcher_does(value):
    # launch.py decides on a dry run from the command line; the launcher reads the same override
    # into its typed schema. One rule (launching.jobs.parse_flag) for both: what one takes for true,
    # so does the other.
    from hydra import compose, initialize_config_dir

    from launching import jobs
    from soda import config

    argument = f"hydra.launcher.dry_run={value}"
    with initialize_config_dir(config_dir=str(config.CONF_DIR), version_base="1.3"):
        composed = compose(config_name="config", overrides=[argument], return_hydra_config=True)
    launcher_reads = composed.hydra.launcher.dry_run
    assert jobs.command_line_flag(["-m", argument], "hydra.launcher.dry_run") is launcher_reads
    assert (dryrun.main(["experiment=demo", argument]) == 2) is launcher_reads  # true without -m: refused


def test_a_flag_that_is_neither_true_nor_false_is_one_line(capsys):
    from soda.errors import ConfigError

    for arguments in (["-m", "seed=0,1"], ["experiment=demo"]):
        with pytest.raises(ConfigError) as error:
            dryrun.main([*arguments, "hydra.launcher.dry_run=maybe"])
        assert str(error.value) == (
            "hydra.launcher.dry_run=maybe is neither true nor false; give true or false (yes/no, on/off and 1/0 are "
            "read too)"
        )
    assert dryrun.main(["-m", "seed=0,1", "hydra.launcher.dry_run=0"]) is None  # a launch, as the launcher reads it


@pytest.mark.integration
def test_dry_run_1_is_a_dry_run_of_a_sweep_that_creates_nothing(tmp_path):
    # The launcher reads 1 as true: once, launch.py did not, and the sweeper created the study, a
    # parent run, four failed trials and optuna_results.yaml before the launcher refused them.
    store = tmp_path / "store"
    work = tmp_path / "work"
    work.mkdir()
    result = launch(
        ["-m", "sweep=augment_ablation", "experiment=demo", "sweep.n_trials=4", "hydra.launcher.dry_run=1"]
        + [f"tracking.uri=sqlite:///{store}/mlflow.db", f"sweep.storage={store}/optuna.log"]
        + [f"tracking.artifact_location={store}/artifacts", f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=work,
        timeout=180,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == (
        "dry run: 4 trials would run on this machine (hydra/launcher=local); nothing was started"
    )
    assert not store.exists() and not (tmp_path / "sweep").exists() and not any(work.iterdir())


def _dry_run(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """launch.py's dry run of `args`, from an empty folder (which must stay empty)."""
    work = tmp_path / "work"
    work.mkdir()
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    environment = {key: value for key, value in environment.items() if value is not None}
    result = launch(["-m", *args, "hydra.launcher.dry_run=true"], cwd=work, timeout=180, env=environment)
    assert not any(work.iterdir()), f"the dry run wrote {sorted(work.rglob('*'))}"
    return result


@pytest.mark.integration
def test_a_local_dry_run_lists_the_jobs_and_how_they_would_share_this_machine(tmp_path):
    result = _dry_run(
        tmp_path, "experiment=demo", "seed=0,1,2", "hydra/launcher=local", "hydra.launcher.threads_per_task=1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[1] == "dry run of 3 trials: python launch.py -m experiment=demo seed=0,1,2 hydra/launcher=local " + (
        "hydra.launcher.threads_per_task=1 hydra.launcher.dry_run=true"
    )
    assert [line for line in lines if line.startswith("---")] == [f"--- trial {n} of 3: seed={n}" for n in range(3)]
    assert lines[-2:] == [
        "this machine shows no GPU (CUDA_VISIBLE_DEVICES=): jobs run on CPUs, each 1 DDP rank, 3 jobs at once; "
        "each rank with 1 thread "
        "(OMP_NUM_THREADS)",
        "dry run: 3 trials would run on this machine (hydra/launcher=local); nothing was started",
    ]


def _fake_gpus(tmp_path: Path, count: int) -> dict:
    """An environment whose nvidia-smi lists `count` GPUs (and no CUDA_VISIBLE_DEVICES)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    smi = folder / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + "".join(f"echo {n}\n" for n in range(count)))
    smi.chmod(0o755)
    return {"PATH": f"{folder}:{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": None, "SODA_SITE": "none"}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "first", "plan"),
    [
        (
            [],
            "SODA_SITE=none: the jobs run on this machine (hydra/launcher=local), with 4 GPUs (nvidia-smi)",
            "4 GPUs (nvidia-smi): each job gets 4 GPUs (CUDA_VISIBLE_DEVICES) and runs 4 DDP ranks, 1 job at once",
        ),
        (
            ["sweep.n_jobs=2"],
            "SODA_SITE=none: the jobs run on this machine (hydra/launcher=local), with 4 GPUs (nvidia-smi)",
            "4 GPUs (nvidia-smi): each job gets 2 GPUs (CUDA_VISIBLE_DEVICES) and runs 2 DDP ranks, 2 jobs at once",
        ),
    ],
)
def test_local_jobs_use_the_gpus_the_machine_shows(tmp_path, args, first, plan):
    result = _dry_run(tmp_path, "sweep=augment_ablation", *args, env=_fake_gpus(tmp_path, 4))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith(first) and lines[-2].startswith(plan)
    assert "no GPU" not in result.stderr


@pytest.mark.heavy
@pytest.mark.integration
def test_a_reference_job_without_a_gpu_is_warned_about_and_too_many_gpus_refused(tmp_path):
    env = _fake_gpus(tmp_path, 2)
    cpu = _dry_run(tmp_path, "sweep=augment_ablation", "hydra.launcher.gpus_per_node=0", env=env)
    assert cpu.returncode == 0, cpu.stderr[-3000:]
    assert cpu.stderr.splitlines() == [
        "warning: job #0 trains model soda_r18_ddpm (128 channels), 800 epochs of cifar10 at batch 512 but gets no "
        "GPU (hydra.launcher.gpus_per_node=0): on CPUs that takes days; give it GPUs (hydra.launcher.gpus_per_node) "
        "or a smaller run (experiment=demo)"
    ]
    (tmp_path / "work").rmdir()
    many = _dry_run(tmp_path, "sweep=augment_ablation", "hydra.launcher.gpus_per_node=4", env=env)
    assert many.returncode == 2
    assert many.stderr.splitlines()[-1] == (
        "error: hydra.launcher.gpus_per_node=4 but this machine shows 2 GPUs (nvidia-smi); set "
        "hydra.launcher.gpus_per_node=2 (or null: every GPU it shows)"
    )


@pytest.mark.integration
def test_a_dry_run_shows_the_trials_as_they_will_run(tmp_path):
    # A sampler: how many trials, how many at a time, the ranges; not the compositions it checked.
    search = _dry_run(tmp_path, "sweep=lr_search", "experiment=demo")
    assert search.returncode == 0, search.stderr[-3000:]
    lines = search.stdout.splitlines()
    assert lines[1].startswith("dry run of a tpe search: 16 trials, 2 at a time: python launch.py -m sweep=lr_search")
    assert lines[2:5] == [
        "  schedule.decoder_lr: tag(log, interval(1e-4, 3e-3))",
        "  schedule.encoder_lr_ratio: tag(log, interval(0.1, 4.0))",
        "  schedule.ema_decay: choice(0.99, 0.999, 0.9999)",
    ]
    assert [line for line in lines if line.startswith("---")] == [
        "--- each of the 16 trials: tpe picks schedule.decoder_lr, schedule.encoder_lr_ratio, schedule.ema_decay"
    ]
    assert lines[-1] == "dry run: 16 trials would run on this machine (hydra/launcher=local); nothing was started"
    # A grid cut by sweep.n_trials: the cells that will run.
    (tmp_path / "work").rmdir()
    grid = _dry_run(tmp_path, "sweep=augment_ablation", "experiment=demo", "sweep.n_trials=4")
    assert grid.returncode == 0, grid.stderr[-3000:]
    lines = grid.stdout.splitlines()
    assert lines[1].startswith("dry run of a grid of 12 cells, the first 4 (sweep.n_trials=4): 4 trials, 1 at a time")
    assert len([line for line in lines if line.startswith("--- trial ")]) == 4


def _our_jobs(tmp_path: Path) -> list[str]:
    """The jobs SLURM holds that were submitted from under tmp_path."""
    queue = subprocess.run(["squeue", "-h", "-o", "%i %Z"], capture_output=True, text=True, check=True).stdout
    return [line for line in queue.splitlines() if str(tmp_path) in line]


@pytest.mark.slurm
@pytest.mark.integration
@needs_slurm
def test_a_slurm_dry_run_shows_each_trials_script_and_slurms_verdict_and_submits_nothing(tmp_path):
    result = _dry_run(tmp_path, "experiment=demo", "sweep=augment_ablation", "hydra/launcher=slurm")
    assert result.returncode == 0, result.stderr[-3000:]
    # Our Optuna sweeper submits one trial at a time: a script, and a verdict, per trial.
    trials = re.split(r"^--- ", result.stdout, flags=re.MULTILINE)[1:]
    assert len(trials) == 12
    for number, trial in enumerate(trials):
        header, *script = trial.splitlines()
        assert re.fullmatch(rf"trial {number} of 12: augmentation/view@augmentation\.target=\w+ .*seed=[01]", header)
        assert script[0] == "#!/bin/bash" and "#SBATCH --time=1440" in script and PREFLIGHT in script
        (verdict,) = [line for line in script if line.startswith("sbatch --test-only")]
        assert re.fullmatch(
            r"sbatch --test-only accepted it: sbatch: Job \d+ to start at .* in partition debug", verdict
        )
    summary = result.stdout.splitlines()[-2:]
    assert summary == [
        "the launcher's check of the request against the partition: passed",
        "dry run: sbatch --test-only accepted 12 of 12 trials in 12 submissions; nothing was submitted",
    ]
    assert _our_jobs(tmp_path) == []


@pytest.mark.slurm
@pytest.mark.integration
@needs_slurm
@pytest.mark.parametrize(
    "args, sbatch_says, we_say",
    [
        (
            ["hydra.launcher.partition=nope"],
            "sbatch: error: invalid partition specified: nope",
            "SLURM: Partition nope not found (hydra.launcher.partition=nope; see `sinfo`)",
        ),
        (
            # scripts/slurm-up.sh's `short` partition has MaxTime=10 (and EnforcePartLimits=ALL).
            ["hydra.launcher.partition=short", "hydra.launcher.timeout_min=20"],
            "allocation failure: Requested time limit is invalid (missing or exceeds some limit)",
            "hydra.launcher.timeout_min=20 is above partition short's MaxTime of 00:10:00 (10 minutes; see sinfo)",
        ),
    ],
)
def test_a_slurm_dry_run_reports_what_sbatch_refuses(tmp_path, args, sbatch_says, we_say):
    result = _dry_run(tmp_path, "experiment=demo", "seed=0,1,2", "hydra/launcher=slurm", *args)
    assert result.returncode == 2, result.stderr[-3000:]
    # Hydra's basic sweeper submits its jobs as one job array: one script, one verdict.
    assert result.stdout.count("#!/bin/bash") == 1 and "#SBATCH --array=0-2%3" in result.stdout
    assert f"sbatch --test-only refused it: {sbatch_says}" in result.stdout
    assert f"the launcher's check of the request against the partition: {we_say}\n" in result.stdout
    # The error quotes SLURM's own answer, not only our scontrol-based check.
    assert result.stderr.splitlines()[-1] == f"error: dry run: sbatch --test-only refused 3 of 3 trials: {sbatch_says}"
    assert _our_jobs(tmp_path) == []
