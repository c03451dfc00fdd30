"""The launchers' checks (hydra_plugins/soda_launchers): what SLURM can give a job, which rank of
a failed job to blame, the shared-store warning, and jobs refused before anything is submitted."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from hydra_plugins.soda_launchers import launchers
from hydra_plugins.soda_launchers.launchers import (
    gres_gpus,
    partition_problem,
    rank_failure,
    scontrol_records,
    slurm_minutes,
)
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
    monkeypatch.setattr(launchers, "_WARNED", set())


def test_file_stores_on_slurm_are_warned_about_once_per_process(caplog, fresh_warning):
    with caplog.at_level(logging.WARNING, logger=launchers.__name__):
        for _ in range(2):
            launchers.warn_about_file_stores("sqlite:////home/me/mlflow.db", "/home/me/journal.log", optuna_sweep=True)
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
    with caplog.at_level(logging.WARNING, logger=launchers.__name__):
        launchers.warn_about_file_stores(uri, storage, optuna_sweep=optuna_sweep)
    assert len(caplog.records) == len(expected[:1])
    assert all(part in caplog.records[0].getMessage() for part in expected)


def _multirun(tmp_path: Path, *args: str, timeout: int = 120):
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
