"""submitit's private APIs that the launchers rely on (see launching/adapters/__init__.py).
pyproject.toml pins submitit to the minor version these were written against."""

from __future__ import annotations

import copy
import types
from collections.abc import Callable


def job_python(executor) -> str:
    """The Python command a SLURM executor's jobs run (hydra.launcher.python, else this
    interpreter, quoted). Gap: AutoExecutor keeps its SlurmExecutor, which holds it, private."""
    return executor._executor.python


def set_visible_gpus(executor, ids: tuple) -> None:
    """The GPUs (CUDA_VISIBLE_DEVICES ids) of the next job a local executor submits. Gap:
    update_parameters(visible_gpus=...) accepts only ints, and CUDA also names GPUs by UUID;
    the parameters themselves sit on AutoExecutor's private LocalExecutor."""
    executor._executor.parameters["visible_gpus"] = ids


def submission_script(executor, jobs: int) -> str:
    """The sbatch script a SLURM executor submits for `jobs` jobs at once: one plain job, or one
    job array (as SlurmExecutor submits a map_array of several). Gap: submitit writes the script
    only as it submits; its text comes from the private _make_submission_file_text."""
    slurm = copy.copy(executor._executor)
    if jobs > 1:
        slurm.parameters = {**slurm.parameters, "map_count": jobs}
    return slurm._make_submission_file_text(slurm._submitit_command_str, "dry-run")


def replace_local_command(executor, submit_command: Callable) -> None:
    """Make a local executor start each job with `submit_command(local_executor, command)`, which
    returns the job's LocalJob. Gap: submitit starts a local job's controller in the private
    LocalExecutor._submit_command, and offers no way to run another controller."""
    local = executor._executor
    local._submit_command = types.MethodType(submit_command, local)


def local_process(job):
    """The controller process (subprocess.Popen) of a local job, or None for any other job. Gap:
    LocalJob.cancel signals the controller only, and only through this private handle can one
    wait for it and kill what it left."""
    return getattr(job, "_process", None)
