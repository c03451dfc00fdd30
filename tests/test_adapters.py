"""The private APIs of submitit and Hydra that launching/adapters/ relies on, and MLflow's
undocumented parts in soda/mlflow_adapter.py: each test fails when the library changes what its
adapter function uses, on a tiny object of that library."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from launching.adapters import hydra as hydra_adapter
from launching.adapters import submitit as submitit_adapter


def _slurm_executor(tmp_path, **params):
    import submitit

    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm", slurm_python="my-python")
    executor.update_parameters(timeout_min=10, **params)
    return executor


def test_job_python_is_the_slurm_executors_python(tmp_path):
    assert submitit_adapter.job_python(_slurm_executor(tmp_path)) == "my-python"


def test_submission_script_is_the_sbatch_script_one_job_or_an_array(tmp_path):
    executor = _slurm_executor(tmp_path, slurm_setup=["echo set-up"])
    one = submitit_adapter.submission_script(executor, jobs=1)
    three = submitit_adapter.submission_script(executor, jobs=3)
    assert one.startswith("#!/bin/bash") and "echo set-up" in one and "my-python -u -m submitit.core._submit" in one
    assert "#SBATCH --array=0-2" in three and "--array" not in one
    assert "map_count" not in executor._executor.parameters  # the executor itself is left as it was
    assert not any(tmp_path.iterdir())  # nothing written


def test_set_visible_gpus_names_a_local_jobs_gpus_by_any_id(tmp_path):
    import submitit

    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="local")
    executor.update_parameters(timeout_min=1, gpus_per_node=1)
    submitit_adapter.set_visible_gpus(executor, ("GPU-a",))
    job = executor.submit(_visible_devices)
    assert job.result() == "GPU-a"


def _visible_devices() -> str:
    import os

    return os.environ["CUDA_VISIBLE_DEVICES"]


def test_replace_local_command_starts_each_job_with_ours_and_local_process_is_its_controller(tmp_path):
    import submitit
    from submitit.local.local import LocalExecutor, LocalJob

    assert list(inspect.signature(LocalExecutor._submit_command).parameters) == ["self", "command"]
    started = []

    def submit_command(local_executor, command):
        started.append(command)
        process = subprocess.Popen([sys.executable, "-c", "pass"])
        return LocalJob(folder=local_executor.folder, job_id=str(process.pid), process=process, tasks=[0])

    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="local")
    executor.update_parameters(timeout_min=1)
    submitit_adapter.replace_local_command(executor, submit_command)
    job = executor.submit(print, "never run")
    assert len(started) == 1 and "submitit" in started[0]
    process = submitit_adapter.local_process(job)
    assert isinstance(process, subprocess.Popen) and process.wait(timeout=30) == 0
    assert submitit_adapter.local_process(object()) is None  # not a local job


def test_get_args_parser_reads_a_command_line_as_hydra_main_does():
    args = hydra_adapter.parse_launch_arguments(["-m", "seed=0,1", "--cfg", "job", "--config-name", "other"])
    assert (args.multirun, args.overrides, args.cfg, args.config_name) == (True, ["seed=0,1"], "job", "other")
    for name in ("help", "hydra_help", "info", "shell_completion", "config_path", "config_dir"):
        assert hasattr(args, name)


@pytest.mark.parametrize("status", ["COMPLETED", "FAILED"])
def test_job_outcome_is_the_return_value_or_the_exception_without_writing_to_stderr(status, capsys):
    from hydra.core.utils import JobReturn, JobStatus

    value = 0.5 if status == "COMPLETED" else RuntimeError("boom")
    result = JobReturn(status=JobStatus[status], _return_value=value)
    assert hydra_adapter.job_outcome(result) is value
    assert capsys.readouterr().err == ""


def test_context_tags_are_the_ones_mlflow_start_run_adds():
    from soda.mlflow_adapter import context_tags

    tags = context_tags({"mine": "1"})
    assert tags["mine"] == "1"
    assert {"mlflow.user", "mlflow.source.name", "mlflow.source.type"} <= set(tags)


def test_watch_system_logs_system_metrics_to_the_store_it_is_given(tmp_path, monkeypatch):
    import time

    import mlflow

    from soda.mlflow_adapter import watch_system

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("watched")).info.run_id
    monitor = watch_system(run_id, client.tracking_uri, resumed=False)
    assert monitor is not None
    time.sleep(1.5)
    monitor.finish()
    assert any(key.startswith("system/") for key in client.get_run(run_id).data.metrics)
