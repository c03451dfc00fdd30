"""The launchers' checks (hydra_plugins/soda_launchers, launching/): what SLURM can give a job, which rank of
a failed job to blame, the shared-store warning, jobs refused before anything is submitted, and
the preflight that stops a SLURM job whose Python cannot import the project."""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launching import checks, failures, local, site, submission
from launching.adapters import submitit as submitit_adapter
from launching.failures import rank_failure
from launching.slurm import gres_gpus, partition_problem, scontrol_records, slurm_minutes
from soda import progress
from tests.helpers import SMOKE, launch
from tests.support.services import needs_slurm

# `scontrol show partition --oneliner` and `scontrol show node --oneliner` of a small GPU cluster
# (values as SLURM 22.05 prints them; an OS field with spaces included).
PARTITIONS = (
    "PartitionName=cpu AllowGroups=ALL Default=YES QoS=N/A DefaultTime=NONE MaxNodes=UNLIMITED "
    "MaxTime=UNLIMITED MinNodes=0 Nodes=c01 State=UP TotalCPUs=8 TotalNodes=1 MaxCPUsPerNode=UNLIMITED "
    "DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED TRES=cpu=8,mem=32000M,node=1,billing=8\n"
    "PartitionName=gpu AllowGroups=ALL Default=NO QoS=N/A DefaultTime=NONE MaxNodes=2 MaxTime=2-00:00:00 "
    "MinNodes=0 Nodes=g[01-03] State=UP TotalCPUs=96 TotalNodes=3 MaxCPUsPerNode=UNLIMITED "
    "DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED TRES=cpu=96,mem=768000M,node=3,billing=96,gres/gpu=10\n"
)
NODES = (
    "NodeName=c01 Arch=x86_64 CPUAlloc=0 CPUEfctv=8 CPUTot=8 Gres=(null) OS=Linux 6.1.0 #1 SMP PREEMPT_DYNAMIC "
    "RealMemory=32000 State=IDLE Partitions=cpu\n"
    "NodeName=g01 Arch=x86_64 CPUAlloc=0 CPUEfctv=32 CPUTot=32 Gres=gpu:a100:4(S:0-1) OS=Linux 6.1.0 #1 SMP "
    "RealMemory=256000 State=IDLE Partitions=gpu\n"
    "NodeName=g02 Arch=x86_64 CPUAlloc=0 CPUEfctv=32 CPUTot=32 Gres=gpu:a100:4(S:0-1) OS=Linux 6.1.0 #1 SMP "
    "RealMemory=256000 State=IDLE Partitions=gpu\n"
    "NodeName=g03 Arch=x86_64 CPUAlloc=0 CPUEfctv=30 CPUTot=32 Gres=gpu:v100:2 OS=Linux 6.1.0 #1 SMP "
    "RealMemory=512000 State=MIXED Partitions=gpu\n"
)


def _partition(name: str) -> dict:
    (record,) = [r for r in scontrol_records(PARTITIONS) if r["PartitionName"] == name]
    return record


def _problem(partition: str, **params) -> str | None:
    request = {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": None, "cpus_per_task": None, "mem_gb": None}
    request["timeout_min"] = 60
    return partition_problem({**request, **params}, _partition(partition), scontrol_records(NODES))


def test_scontrol_records_keep_values_with_spaces_and_equals_signs():
    first, *_ = scontrol_records(NODES)
    assert first["OS"] == "Linux 6.1.0 #1 SMP PREEMPT_DYNAMIC" and first["RealMemory"] == "32000"
    assert _partition("gpu")["TRES"] == "cpu=96,mem=768000M,node=3,billing=96,gres/gpu=10"
    assert len(scontrol_records(PARTITIONS)) == 2 and scontrol_records("\n\n") == []


@pytest.mark.parametrize(
    "text, minutes",
    [("UNLIMITED", None), ("INFINITE", None), ("30", 30), ("30:30", 30.5), ("1:00:00", 60), ("2-00:00:00", 2880)]
    + [("1-12", 2160), ("1-00:30", 1470)],
)
def test_slurm_times_in_minutes(text, minutes):
    assert slurm_minutes(text) == minutes


@pytest.mark.parametrize(
    "gres, gpus",
    [("(null)", 0), ("gpu:4", 4), ("gpu:a100:4(S:0-1)", 4), ("gpu:a100:2,gpu:v100:2", 4), ("gpu:2,shard:8", 2)],
)
def test_gpus_from_a_nodes_gres(gres, gpus):
    assert gres_gpus(gres) == gpus


@pytest.mark.parametrize(
    "partition, params, message",
    [
        ("cpu", {"nodes": 4}, "hydra.launcher.nodes=4 but partition cpu has 1 node (see sinfo)"),
        ("gpu", {"nodes": 3}, "hydra.launcher.nodes=3 is above partition gpu's MaxNodes of 2 (see sinfo)"),
        (
            "cpu",
            {"gpus_per_node": 1, "tasks_per_node": 1},
            "hydra.launcher.gpus_per_node=1 but the nodes of partition cpu have no GPUs (Gres; see sinfo)",
        ),
        (
            "gpu",
            {"gpus_per_node": 8, "tasks_per_node": 8},
            "hydra.launcher.gpus_per_node=8 but the nodes of partition gpu have at most 4 GPUs (Gres; see sinfo)",
        ),
        (
            "cpu",
            {"tasks_per_node": 4, "cpus_per_task": 4},
            "hydra.launcher.cpus_per_task=4 x tasks_per_node=4 = 16 CPUs per node but the nodes of partition cpu "
            "have at most 8 CPUs (see sinfo)",
        ),
        (
            "cpu",
            {"tasks_per_node": 9},
            "hydra.launcher.cpus_per_task=1 x tasks_per_node=9 = 9 CPUs per node but the nodes of partition cpu "
            "have at most 8 CPUs (see sinfo)",
        ),
        (
            "cpu",
            {"mem_gb": 64},
            "hydra.launcher.mem_gb=64 but the nodes of partition cpu have at most 31 GB (RealMemory=32000 MB; see "
            "sinfo)",
        ),
        (
            "gpu",
            {"timeout_min": 3000},
            "hydra.launcher.timeout_min=3000 is above partition gpu's MaxTime of 2-00:00:00 (2880 minutes; see sinfo)",
        ),
        # Two nodes with 4 GPUs exist; only g01 and g02 have them, and 32 CPUs only those two.
        (
            "gpu",
            {"nodes": 2, "gpus_per_node": 4, "tasks_per_node": 4, "cpus_per_task": 8},
            None,
        ),
    ],
)
def test_a_request_the_partition_cannot_satisfy_is_named(partition, params, message):
    assert _problem(partition, **params) == message


def test_nodes_must_have_every_resource_at_once():
    # g01 and g02: 4 GPUs, 32 CPUs, 250 GB; g03: 2 GPUs, 30 CPUs, 500 GB.
    assert _problem("gpu", nodes=2, gpus_per_node=4, tasks_per_node=4, cpus_per_task=8, mem_gb=250) is None
    assert _problem("gpu", gpus_per_node=4, tasks_per_node=4, mem_gb=400) == (
        "hydra.launcher.nodes=1 but partition gpu has no node with 4 GPUs, 4 CPUs and 400 GB at once (see sinfo)"
    )
    assert _problem("gpu", nodes=2, gpus_per_node=2, tasks_per_node=2, mem_gb=300) == (
        "hydra.launcher.nodes=2 but partition gpu has 1 node with 2 GPUs, 2 CPUs and 300 GB at once (see sinfo)"
    )


def _write_logs(folder: Path, job: str, logs: dict[int, tuple[str, str]]) -> list[list[Path]]:
    """Each rank's (.err, .out) text as submitit names them; returns each rank's log paths."""
    paths = []
    for rank, texts in sorted(logs.items()):
        pair = [folder / f"{job}_{rank}_log.err", folder / f"{job}_{rank}_log.out"]
        for path, text in zip(pair, texts, strict=True):
            path.write_text(text)
        paths.append(pair)
    return paths


TRACEBACK = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n    run()\n'


def test_the_rank_that_failed_first_is_blamed_not_the_one_its_peer_broke(tmp_path):
    logs = _write_logs(
        tmp_path,
        "77",
        {
            0: ("", "[2026-11-29 17:46:39,822][soda.train][ERROR] - rank 0 failed\n" + TRACEBACK
                + "RuntimeError: [pair.cc:545] Read error [127.0.0.1]:12700: Connection reset by peer.\n"),
            1: ("", "[2026-11-29 17:46:39,718][soda.train][ERROR] - rank 1 failed\n" + TRACEBACK
                + "ValueError: boom\n  with a second line\n"),
        },
    )  # fmt: skip
    assert rank_failure(logs) == f"rank 1 failed: ValueError: boom; full log: {tmp_path}/77_1_log.out"


def test_ranks_failing_alike_are_named_together_and_a_chained_error_by_its_last_exception(tmp_path):
    chained = TRACEBACK + "KeyError: 'x'\n\nThe above exception was the direct cause of the following exception:\n\n"
    logs = _write_logs(
        tmp_path,
        "5_3",
        {
            0: (chained + TRACEBACK + "soda.errors.DataError: no images\n", "starting\n"),
            1: (chained + TRACEBACK + "soda.errors.DataError: no images\n", "starting\n"),
            2: ("", "still training, then killed\n"),
        },
    )
    assert (
        rank_failure(logs) == f"ranks 0, 1 failed: soda.errors.DataError: no images; full log: {tmp_path}/5_3_0_log.err"
    )


def test_a_job_whose_ranks_logged_no_error_has_no_story(tmp_path):
    logs = _write_logs(tmp_path, "9", {0: ("", "killed\n"), 1: ("slurmstepd: error: *** STEP CANCELLED ***\n", "")})
    assert rank_failure(logs) is None
    assert rank_failure([[tmp_path / "absent_0_log.err", tmp_path / "absent_0_log.out"]]) is None


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(checks, "_WARNED", set())


def test_file_stores_on_slurm_are_warned_about_once_per_process(caplog, fresh_warning):
    with caplog.at_level(logging.WARNING, logger=checks.__name__):
        for _ in range(2):
            checks.warn_about_file_stores("sqlite:////home/me/mlflow.db", "/home/me/journal.log", optuna_sweep=True)
    (record,) = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING and "\n" not in message
    assert "tracking.uri=sqlite:////home/me/mlflow.db" in message and "tracking=server" in message
    assert "sweep.storage=/home/me/journal.log" in message and "postgresql://" in message


@pytest.mark.parametrize(
    "uri, storage, optuna_sweep, expected",
    [
        ("http://mlflow:5000", "postgresql://db/optuna", True, []),
        ("http://mlflow:5000", "/home/me/journal.log", False, []),  # no Optuna sweep: storage unused
        ("http://mlflow:5000", "sqlite:////home/me/optuna.db", True, ["sweep.storage=sqlite"]),
        ("sqlite:////home/me/mlflow.db", "postgresql://db/optuna", True, ["tracking.uri=sqlite"]),
    ],
)
def test_only_file_stores_are_warned_about(caplog, fresh_warning, uri, storage, optuna_sweep, expected):
    with caplog.at_level(logging.WARNING, logger=checks.__name__):
        checks.warn_about_file_stores(uri, storage, optuna_sweep=optuna_sweep)
    assert len(caplog.records) == len(expected[:1])
    assert all(part in caplog.records[0].getMessage() for part in expected)


def _multirun(tmp_path: Path, *args: str, timeout: int = 120, env: dict | None = None):
    return launch(
        [
            "-m",
            "experiment=demo",
            *SMOKE,
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_location={tmp_path}/artifacts",
            f"hydra.sweep.dir={tmp_path}/sweep",
            *args,
        ],
        timeout=timeout,
        env=env,
    )


def _one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["+model.foo=1"], "error: model.foo is not a config key"),
        (["+schedule.epochz=2,3"], "error: schedule.epochz is not a config key; did you mean schedule.epochs?"),
        (["schedule.epochs=2,-1"], "error: schedule.epochs=-1 must be at least 1"),
        (
            ["hydra.launcher.nodes=2"],
            "error: hydra/launcher=local runs on this machine: hydra.launcher.nodes must be 1",
        ),
    ],
)
def test_every_job_of_a_multirun_is_checked_before_any_is_submitted(tmp_path, args, message):
    line = _one_error_line(_multirun(tmp_path, "hydra/launcher=local", *args))
    assert line.startswith(message), line
    submitit = tmp_path / "sweep" / ".submitit"
    assert not submitit.exists() or not any(submitit.iterdir())


@pytest.mark.slurm
@needs_slurm
@pytest.mark.parametrize(
    "args, message",
    [
        (["hydra.launcher.nodes=4"], r"hydra.launcher.nodes=4 but partition \w+ has 1 node \(see sinfo\)"),
        (
            ["hydra.launcher.gpus_per_node=1"],
            r"hydra.launcher.gpus_per_node=1 but the nodes of partition \w+ have no GPUs",
        ),
        (
            ["hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=64"],
            r"hydra.launcher.cpus_per_task=64 x tasks_per_node=2 = 128 CPUs per node but the nodes of partition "
            r"\w+ have at most \d+ CPUs",
        ),
        (["hydra.launcher.mem_gb=100000"], r"hydra.launcher.mem_gb=100000 but the nodes of partition \w+ have at most"),
    ],
)
def test_a_slurm_request_the_default_partition_cannot_satisfy_is_refused_before_submission(tmp_path, args, message):
    line = _one_error_line(_multirun(tmp_path, "hydra/launcher=slurm", *args))
    assert re.fullmatch(f"error: {message}.*", line), line
    submitit = tmp_path / "sweep" / ".submitit"
    assert not submitit.exists() or not any(submitit.iterdir())


# ---------------------------------------------------------------------------------------------
# What a multirun says as its jobs end.


@pytest.mark.parametrize(
    "launcher",
    [
        ["hydra/launcher=local"],
        pytest.param(
            ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1"],
            marks=[pytest.mark.slurm, needs_slurm, pytest.mark.heavy],
        ),
    ],
)
def test_a_multirun_says_how_each_job_ended_as_it_ends_then_counts_them(tmp_path, launcher):
    # Job 1's data set is not there (which only reading it tells; a value the config can refuse
    # stops the launch before any job): it fails as it starts, long before job 0 ends.
    result = _multirun(tmp_path, *launcher, "dataset.name=shapes,nowhere", timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line.split("[HYDRA] ", 1)[-1] for line in result.stdout.splitlines()]
    ended = [line for line in lines if re.match(r"\t#\d dataset\.name=\w+: ", line)]
    assert len(ended) == 2, result.stdout
    failed = re.fullmatch(
        r"\t#1 dataset\.name=nowhere: failed after \w+: DataError: nowhere not found under \S+ \(nowhere is read as "
        r"an image folder; .*; log: (\S+_log\.out)",
        ended[0],
    )
    assert failed, ended  # the job that ended first is reported first, not in submission order
    finished = re.fullmatch(
        r"\t#0 dataset\.name=shapes: finished after \w+: epoch 1, objective eval/linear_acc=([\d.]+), "
        r"eval/knn_acc=([\d.]+); log: (\S+_log\.out)",
        ended[1],
    )
    assert finished, ended
    written = progress.read_result(tmp_path / "sweep" / "0")
    assert finished[1] == f"{written['metrics']['eval/linear_acc']:.4f}"
    assert finished[2] == f"{written['metrics']['eval/knn_acc']:.4f}"
    assert "final eval/knn_acc=" in Path(finished[3]).read_text()
    assert Path(failed[1]).parent.parent == tmp_path / "sweep" / ".submitit" and Path(failed[1]).exists()
    assert lines[-1] == f"2 jobs: 1 finished, 1 failed; sweep dir {tmp_path}/sweep"


class _Paths:
    def __init__(self, folder: Path, name: str):
        self.stdout, self.stderr = folder / f"{name}_log.out", folder / f"{name}_log.err"


class _Job:
    """What _crash reads of a submitit job: its tasks' log files and its scheduler state."""

    def __init__(self, folder: Path, logs: dict[int, str], state: str = "FINISHED"):
        self.num_tasks, self.state, self.job_id = len(logs), state, "7"
        self._tasks = {rank: _Paths(folder, f"7_{rank}") for rank in logs}
        for rank, text in logs.items():
            self._tasks[rank].stdout.write_text(text)
            self._tasks[rank].stderr.write_text("")

    def task(self, rank: int):
        job = type("Task", (), {})()
        job.paths = self._tasks[rank]
        return job


def _traceback(line: str) -> str:
    return f"[2026-11-29 10:00:00,000][root][INFO] - started\nTraceback (most recent call last):\n  File x\n{line}\n"


@pytest.mark.parametrize(
    "logs, state, expected",
    [
        ({0: _traceback("RuntimeError: boom")}, "FINISHED", ("failed", "RuntimeError: boom", 0)),
        ({0: _traceback("KeyboardInterrupt: interrupted (SIGINT); resume")}, "FINISHED", ("stopped", None, 0)),
        ({0: _traceback("soda.errors.Terminated: terminated (SIGTERM)")}, "FINISHED", ("stopped", None, 0)),
        ({0: "no traceback"}, "CANCELLED by 1000", ("stopped", "the job ended", 0)),
        (
            {0: _traceback("RuntimeError: Connection reset by peer"), 1: _traceback("ValueError: bad")},
            "FAILED",
            ("failed", "ValueError: bad (rank 1)", 1),
        ),
    ],
)
def test_a_job_without_a_result_is_failed_or_stopped_by_its_logs_and_state(tmp_path, logs, state, expected):
    ending, line, log_path = failures.crash(_Job(tmp_path, logs, state), RuntimeError("the job ended"))
    want_ending, want_line, rank = expected
    assert ending == want_ending
    assert want_line is None or line == want_line
    assert log_path == tmp_path / f"7_{rank}_log.out"


def test_a_job_line_shows_the_overrides_that_tell_the_jobs_apart():
    jobs = [["experiment=demo", "seed=0", "hydra.run.dir=x"], ["experiment=demo", "seed=1", "hydra.run.dir=x"]]
    assert submission.shown_overrides(jobs) == ["seed=0", "seed=1"]
    assert submission.shown_overrides([["experiment=demo", "seed=0"]]) == ["experiment=demo seed=0"]


class _FakeJob(_Job):
    """A job that ends at the `ends_at`-th look, with a JobReturn or without a result."""

    def __init__(self, folder: Path, ends_at: int, result=None, log: str = ""):
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__(folder, {0: log})
        self.job_id, self.looks, self.ends_at, self.result = folder.name, 0, ends_at, result

    def done(self):
        self.looks += 1
        return self.looks >= self.ends_at

    def results(self):
        from submitit.core.utils import FailedJobError

        if self.result is None:
            raise FailedJobError("the job has not produced any output")
        return [self.result]


def _finished(run_dir: Path, objective: float):
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    metrics = {"eval/knn_acc": 0.25, "eval/linear_acc": objective}
    progress.write_result(run_dir, {"epoch": 3, "metrics": metrics, "objective": {"eval/linear_acc": objective}})
    config = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(run_dir)}}})
    return JobReturn(hydra_cfg=config, status=JobStatus.COMPLETED, _return_value=objective)


def _wait(tmp_path, jobs, report_each_job: bool = True):
    overrides = [["experiment=demo", f"seed={n}"] for n in range(len(jobs))]
    return submission.wait_for(jobs, overrides, 0, tmp_path / "sweep", report_each_job)


def test_jobs_are_reported_as_they_end_and_a_dead_one_fails_the_launch_after_all_ended(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(submission, "POLL_S", 0.0)
    caplog.set_level(logging.INFO, logger=submission.__name__)
    crash = _traceback("RuntimeError: out of memory")
    jobs = [
        _FakeJob(tmp_path / "10", ends_at=5, result=_finished(tmp_path / "run0", 0.75)),
        _FakeJob(tmp_path / "11", ends_at=2, log=crash),
        _FakeJob(tmp_path / "12", ends_at=3, result=_finished(tmp_path / "run2", 0.5)),
    ]
    with pytest.raises(checks.LauncherError, match=r"^job 11 failed: RuntimeError: out of memory; full log: "):
        _wait(tmp_path, jobs)
    assert all(job.looks == job.ends_at for job in jobs)  # every job was waited for
    lines = [re.sub(r" after \w+:", " after T:", record.getMessage()) for record in caplog.records]
    assert lines == [
        f"\t#1 seed=1: failed after T: RuntimeError: out of memory; log: {tmp_path}/11/7_0_log.out",
        f"\t#2 seed=2: finished after T: epoch 3, objective eval/linear_acc=0.5000, eval/knn_acc=0.2500; "
        f"log: {tmp_path}/12/7_0_log.out",
        f"\t#0 seed=0: finished after T: epoch 3, objective eval/linear_acc=0.7500, eval/knn_acc=0.2500; "
        f"log: {tmp_path}/10/7_0_log.out",
        f"3 jobs: 2 finished, 1 failed; sweep dir {tmp_path}/sweep",
    ]


def test_under_our_sweeper_the_launcher_leaves_the_reporting_to_it(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(submission, "POLL_S", 0.0)
    caplog.set_level(logging.INFO, logger=submission.__name__)
    finished = _finished(tmp_path / "run0", 0.75)
    results = _wait(tmp_path, [_FakeJob(tmp_path / "10", 2, finished)], report_each_job=False)
    assert results == [finished] and caplog.records == []


# ---------------------------------------------------------------------------------------------
# The preflight: a SLURM job whose Python cannot import the project stops with one line.

ADVICE = "activate the project's environment in hydra.launcher.setup, or set hydra.launcher.python"
HOST = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()


def _preflight(python: str, cwd: Path, path: str | None = None) -> subprocess.CompletedProcess:
    """The preflight line, then `echo ran`, in bash, as the job's script runs them."""
    env = {**os.environ, "PATH": path or os.environ["PATH"]}
    script = submission.preflight_line(python) + "\necho ran\n"
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True)


def _fake_python(folder: Path, stderr: str, status: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    python = folder / "python"
    python.write_text(f"#!/bin/sh\nprintf %s {shlex.quote(stderr)} >&2\nexit {status}\n")
    python.chmod(0o755)
    return python


def test_the_preflight_lets_an_interpreter_that_imports_the_project_run_the_job(tmp_path):
    # A path with a space, quoted as submitit quotes sys.executable.
    wrapper = tmp_path / "my env" / "python"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    wrapper.chmod(0o755)
    ran = _preflight(shlex.quote(str(wrapper)), cwd=tmp_path)
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, "ran\n", "")


def test_the_preflight_names_the_interpreter_it_found_and_its_import_error(tmp_path):
    error = (
        "Traceback (most recent call last):\n  File \"<string>\", line 1\nModuleNotFoundError: No module named 'soda'\n"
    )
    fake = _fake_python(tmp_path / "bin", error, 1)
    ran = _preflight("python", cwd=tmp_path, path=f"{fake.parent}:{os.environ['PATH']}")
    assert ran.returncode == 1 and ran.stdout == ""
    assert ran.stderr == (
        f"soda preflight on {HOST}: the job's Python {fake} cannot import the project "
        f"(ModuleNotFoundError: No module named 'soda'); {ADVICE}\n"
    )


def test_the_preflight_says_when_the_interpreter_is_not_found(tmp_path):
    ran = _preflight("soda-no-such-python -X dev", cwd=tmp_path)
    assert ran.returncode == 1 and ran.stdout == ""
    assert ran.stderr == f"soda preflight on {HOST}: the job's Python soda-no-such-python was not found; {ADVICE}\n"


def test_a_job_its_preflight_stopped_fails_the_launch_with_that_line(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(submission, "POLL_S", 0.0)
    caplog.set_level(logging.INFO, logger=submission.__name__)
    line = f"soda preflight on vm: the job's Python /usr/bin/python3 cannot import the project (...); {ADVICE}"
    # The scheduler never says the job ended (sacct without accounting): its log does.
    job = _FakeJob(tmp_path / "31", ends_at=10**9)
    job.task(0).paths.stderr.write_text(f"module: loaded\n{line}\n")
    with pytest.raises(checks.LauncherError) as raised:
        _wait(tmp_path, [job])
    assert str(raised.value) == f"job 31: {line}"
    assert re.sub(r" after \w+:", " after T:", caplog.records[0].getMessage()) == (
        f"\t#0 experiment=demo seed=0: failed after T: {line}; log: {tmp_path}/31/7_0_log.err"
    )
    # A job the scheduler says ended is reported by the same line.
    assert failures.job_failure(job, RuntimeError("no output")) == f"job 31: {line}"
    assert failures.crash(job, RuntimeError("no output")) == ("failed", line, tmp_path / "31" / "7_0_log.err")


def test_the_preflight_runs_after_the_setup_lines_and_before_srun(tmp_path):
    params = {"submitit_folder": str(tmp_path / "%j"), "setup": ["module load cuda"], "python": "python"}
    params |= {"nodes": 1, "tasks_per_node": 1, "timeout_min": 10, "srun_args": ["--kill-on-bad-exit=1"]}
    script = submission.submission_script(submission.make_executor("slurm", params), jobs=1).splitlines()
    setup, preflight = script.index("module load cuda"), script.index(submission.preflight_line("python"))
    srun = next(n for n, line in enumerate(script) if line.startswith("srun "))
    assert setup < preflight < srun and script[srun].endswith(f"python -u -m submitit.core._submit {tmp_path}/%j")
    assert not any(tmp_path.iterdir())  # building the script writes nothing


def _without_this_venv() -> dict:
    """This environment with the test's virtualenv off PATH, as a login shell that did not activate it."""
    venv_bin = str(Path(sys.prefix) / "bin")
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p.rstrip("/") != venv_bin)
    return {**os.environ, "PATH": path, "VIRTUAL_ENV": ""}


@pytest.mark.slurm
@needs_slurm
def test_a_slurm_job_whose_python_lacks_the_project_fails_with_the_preflight_line(tmp_path):
    env = _without_this_venv()
    python3 = shutil.which("python3", path=env["PATH"])
    assert python3 and subprocess.run([python3, "-c", "import submitit"], capture_output=True).returncode != 0
    result = _multirun(tmp_path, "hydra/launcher=slurm", "hydra.launcher.python=python3", env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [result.stderr.splitlines()[-1]], result.stderr[-3000:]
    assert re.fullmatch(
        rf"error: job \d+: soda preflight on {re.escape(HOST)}: the job's Python {re.escape(python3)} cannot import "
        rf"the project \(ModuleNotFoundError: No module named '\w+'\); {re.escape(ADVICE)}",
        errors[0],
    ), errors[0]
    assert not (tmp_path / "sweep" / "0").exists()  # the run never started


@pytest.mark.heavy
@pytest.mark.slurm
@needs_slurm
def test_setup_lines_run_before_the_job_and_can_activate_its_environment(tmp_path):
    activate = Path(sys.prefix) / "bin" / "activate"
    assert activate.exists(), f"the tests run in a virtualenv ({sys.prefix} has no bin/activate)"
    marker = tmp_path / "marker"
    setup = f"hydra.launcher.setup=['source {activate}','echo setup-ran > {marker}']"
    result = _multirun(
        tmp_path,
        "hydra/launcher=slurm",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.python=python",
        setup,
        env=_without_this_venv(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.read_text() == "setup-ran\n"
    assert progress.read_result(tmp_path / "sweep" / "0")["epoch"] == 1


@pytest.mark.heavy
@pytest.mark.slurm
@needs_slurm
def test_a_slurm_job_cancelled_from_outside_ends_the_launch_without_accounting(tmp_path):
    """The test cluster has no accounting: submitit, which sees a job end by its result file or by
    sacct, would wait forever for a job cancelled before it wrote one. scontrol tells the launch."""
    command = [
        sys.executable,
        str(Path(__file__).resolve().parents[1] / "launch.py"),
        "-m",
        "experiment=demo",
        *SMOKE,
        "schedule.epochs=500",  # runs until cancelled
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.artifact_location={tmp_path}/artifacts",
        f"hydra.sweep.dir={tmp_path}/sweep",
        "hydra/launcher=slurm",
        "hydra.launcher.cpus_per_task=1",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = None
        for _ in range(120):
            running = subprocess.run(["squeue", "-h", "-o", "%i %T %o"], capture_output=True, text=True).stdout
            job = next((line.split()[0] for line in running.splitlines() if str(tmp_path) in line), None)
            if job is not None and " RUNNING " in running:
                break
            time.sleep(0.5)
        assert job is not None, "the job was never seen running"
        subprocess.run(["scancel", job], check=True)
        cancelled = time.monotonic()
        stdout, stderr = process.communicate(timeout=90)
        waited = time.monotonic() - cancelled
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 2, stderr[-3000:]
    assert waited < 60  # two looks at scontrol, SCONTROL_EVERY_S apart
    assert re.search(
        rf"\t#0 [^\n]*: stopped after \w+: job {job} ended \(CANCELLED\) without a result", stdout + stderr
    )


def _gpus(*ids: str) -> site.VisibleGPUs:
    return site.VisibleGPUs(tuple(ids), "CUDA_VISIBLE_DEVICES=" + ",".join(ids))


@pytest.mark.parametrize(
    ("params", "at_once", "visible", "gpus", "tasks", "groups"),
    [
        ({}, 1, ("0", "1", "2", "3"), 4, 4, [("0", "1", "2", "3")]),  # one job: every GPU, a rank each
        ({}, 2, ("0", "1", "2", "3"), 2, 2, [("0", "1"), ("2", "3")]),  # two at once: half each
        ({}, 3, ("4", "6"), 1, 1, [("4",), ("6",)]),  # more jobs than GPUs: one each, shared
        ({}, 2, (), 0, 1, [()]),  # no GPU: CPUs
        ({"tasks_per_node": 2}, 1, (), 0, 2, [()]),  # ranks on CPUs, as asked
        ({"tasks_per_node": 1}, 1, ("0", "1"), 1, 1, [("0",), ("1",)]),  # one rank: one GPU
        ({"gpus_per_node": 0}, 1, ("0", "1"), 0, 1, [()]),  # CPUs, explicitly
        ({"gpus_per_node": 1, "tasks_per_node": 1}, 2, ("GPU-a", "GPU-b"), 1, 1, [("GPU-a",), ("GPU-b",)]),
    ],
)
def test_local_jobs_get_the_gpus_the_machine_shows(params, at_once, visible, gpus, tasks, groups):
    plan = local.local_plan({"gpus_per_node": None, "tasks_per_node": None, **params}, at_once, _gpus(*visible))
    assert (plan.params["gpus_per_node"], plan.params["tasks_per_node"]) == (gpus, tasks)
    assert list(plan.groups) == groups


def test_local_jobs_in_flight_take_the_least_used_gpus():
    plan = local.local_plan({"gpus_per_node": None, "tasks_per_node": None}, 2, _gpus("0", "1", "2", "3"))
    first, second, third = (local.take_gpus(plan) for _ in range(3))
    assert {first, second} == {("0", "1"), ("2", "3")} and third in (first, second)
    local.release_gpus([first, third])
    assert local.take_gpus(plan) == first  # held by no job now; the other by one
    local.release_gpus([second, first])
    assert not any(local._GPU_USE.values())


def test_more_gpus_than_the_machine_shows_is_one_line():
    with pytest.raises(checks.LauncherError) as refused:
        local.local_plan({"gpus_per_node": 2, "tasks_per_node": 2}, 1, _gpus("0"))
    assert str(refused.value) == (
        "hydra.launcher.gpus_per_node=2 but this machine shows 1 GPU (CUDA_VISIBLE_DEVICES=0); set "
        "hydra.launcher.gpus_per_node=1 (or null: every GPU it shows)"
    )


def _visible_devices() -> str:
    return os.environ["CUDA_VISIBLE_DEVICES"]


def test_a_local_job_sees_only_the_gpus_it_was_given(tmp_path):
    # submitit's local executor, as the launcher drives it: the job's CUDA_VISIBLE_DEVICES is its set.
    plan = local.local_plan({"gpus_per_node": 1, "tasks_per_node": None}, 2, _gpus("GPU-a", "GPU-b"))
    executor = submission.make_executor("local", {**plan.params, "submitit_folder": str(tmp_path / "%j")})
    seen = []
    for group in plan.groups:
        submitit_adapter.set_visible_gpus(executor, group)
        seen.append(executor.submit(_visible_devices).result())
    assert seen == ["GPU-a", "GPU-b"]


@pytest.mark.parametrize(
    ("listed", "ids"),
    [("0,1", ("0", "1")), ("", ()), ("-1", ()), ("2,-1,3", ("2",)), ("GPU-5f3a,MIG-1", ("GPU-5f3a", "MIG-1"))],
)
def test_visible_gpus_follow_cudas_rule(monkeypatch, listed, ids):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    assert site.visible_gpus().ids == ids


def test_visible_gpus_ask_nvidia_smi_without_cuda_visible_devices(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert site.visible_gpus() == site.VisibleGPUs((), "nvidia-smi was not found")
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf '0\\n1\\n'\n")
    smi.chmod(0o755)
    assert site.visible_gpus() == site.VisibleGPUs(("0", "1"), "nvidia-smi")
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver'\nexit 9\n")
    assert site.visible_gpus().text == (
        "no GPU (nvidia-smi failed: NVIDIA-SMI has failed because it could not communicate with the driver)"
    )


def test_local_jobs_start_all_or_none_and_give_their_gpus_back():
    class Job:
        def __init__(self, params):
            self.params, self.cancelled = params, False

        def cancel(self, check=True):
            self.cancelled = True

    class Executor:  # submitit's AutoExecutor as submit_local uses it; the third submission fails
        def __init__(self):
            self._executor = type("Local", (), {"parameters": {}})()
            self.jobs = []

        def submit(self, function, *params):
            if len(self.jobs) == 2:
                raise OSError("cannot start the job's controller")
            self.jobs.append(Job((function, self._executor.parameters["visible_gpus"], *params)))
            return self.jobs[-1]

    plan = local.local_plan({"gpus_per_node": None, "tasks_per_node": None}, 3, _gpus("0", "1", "2"))
    executor, taken = Executor(), []
    with pytest.raises(OSError, match="controller"):
        local.submit_local(executor, print, [("a",), ("b",), ("c",)], plan, taken)
    assert [job.params for job in executor.jobs] == [(print, ("0",), "a"), (print, ("1",), "b")]
    assert all(job.cancelled for job in executor.jobs)
    assert taken == [("0",), ("1",), ("2",)]  # the caller gives them back, as _submit_and_wait does
    local.release_gpus(taken)
    assert not any(local._GPU_USE.values())


def test_a_job_slurm_requeued_is_said_once_per_requeue(caplog, monkeypatch):
    from launching import slurm

    def shown(restarts: int, state: str = "PENDING Reason=BeginTime") -> str:
        return f"JobId=901 JobName=launch JobState={state} Dependency=(null) Requeue=1 Restarts={restarts} BatchFlag=1"

    answers = iter([shown(0, "RUNNING Reason=None"), shown(1), shown(1), shown(1, "RUNNING Reason=None"), shown(2)])
    monkeypatch.setattr(
        slurm.subprocess,
        "run",
        lambda *args, **kwargs: subprocess.CompletedProcess(args, 0, stdout=next(answers), stderr=""),
    )
    with caplog.at_level(logging.WARNING, logger="launching.slurm"):
        for _ in range(5):
            assert slurm.ended_per_scontrol("901") is None  # still in the queue
    assert [record.getMessage() for record in caplog.records] == [
        "job 901 was requeued by SLURM (1 requeue so far): it resumes from its run's last checkpoint when it "
        "starts again",
        "job 901 was requeued by SLURM (2 requeues so far): it resumes from its run's last checkpoint when it "
        "starts again",
    ]
