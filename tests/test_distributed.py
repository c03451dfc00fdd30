"""Several ranks, for real: gloo process groups on the CPU, submitit's local executor, and the
single-node SLURM cluster that `make slurm-up` starts (tests marked `slurm`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from tests.helpers import REPO, SMOKE, free_port, launch, run_ranks
from tests.support.services import needs_slurm
from tests.support.slurm import preempt, release_requeued, squeue

TRACK = "tracking.experiment=soda"


def _runs(tmp_path: Path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("soda")
    return client, ([] if experiment is None else client.search_runs([experiment.experiment_id]))


def _multirun(tmp_path: Path, *args: str, timeout: int = 600, env: dict | None = None):
    return launch(
        [
            "-m",
            "experiment=demo",
            *SMOKE,
            TRACK,
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_location={tmp_path}/artifacts",
            f"hydra.sweep.dir={tmp_path}/sweep",
            *args,
        ],
        timeout=timeout,
        env=env,
    )


def test_two_gloo_ranks_apply_identical_gradients(tmp_path):
    run_ranks("tests.support.gradient_worker", 2, "2", str(free_port()), str(tmp_path))
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert first["grads"].keys() == second["grads"].keys() and len(first["grads"]) > 100
    assert all(torch.equal(first["grads"][k], second["grads"][k]) for k in first["grads"])
    assert all(torch.equal(a, b) for a, b in zip(first["params"], second["params"], strict=True))


@pytest.mark.heavy
def test_two_rank_job_through_the_local_launcher_matches_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for folder, tasks in ((one, 1), (two, 2)):
        result = _multirun(folder, "hydra/launcher=local", f"hydra.launcher.tasks_per_node={tasks}")
        assert result.returncode == 0, result.stderr[-3000:]
    client_one, (run_one,) = _runs(one)
    client_two, (run_two,) = _runs(two)
    assert run_one.data.tags["world_size"] == "1" and run_two.data.tags["world_size"] == "2"
    assert run_two.info.status == "FINISHED"
    losses_one = [m.value for m in client_one.get_metric_history(run_one.info.run_id, "train/loss")]
    losses_two = [m.value for m in client_two.get_metric_history(run_two.info.run_id, "train/loss")]
    assert len(losses_one) == len(losses_two) == 3
    # Same weights, same global batch; only the noise and timestep draws differ per rank.
    assert all(abs(a - b) / a < 0.25 for a, b in zip(losses_one, losses_two, strict=True)), (losses_one, losses_two)
    # Logs where the README says: one pair of files per rank.
    logs = sorted(p.name for p in (two / "sweep" / ".submitit").rglob("*_log.err"))
    assert len(logs) == 2 and logs[0].endswith("_0_log.err") and logs[1].endswith("_1_log.err")


@pytest.mark.heavy
def test_a_rank_that_crashes_ends_the_whole_job_promptly(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests' / 'support'}", "SODA_TEST_FAIL_RANK": "1"}
    started = time.monotonic()
    result = _multirun(
        tmp_path, "hydra/launcher=local", "hydra.launcher.tasks_per_node=2", "schedule.epochs=3", timeout=300, env=env
    )
    assert result.returncode == 2
    assert time.monotonic() - started < 120
    # One line: the rank that failed first (not rank 0, which only lost its peer), its error, its log.
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    match = re.fullmatch(r"error: rank 1 failed: RuntimeError: injected failure on rank 1; full log: (\S+)", lines[0])
    assert match, lines[0]
    log = Path(match[1])
    assert log.parent.parent == tmp_path / "sweep" / ".submitit" and log.name.endswith("_1_log.out")
    assert "injected failure on rank 1" in log.read_text()
    _, (run,) = _runs(tmp_path)
    assert run.info.status == "FAILED"


@pytest.mark.parametrize(
    "args, gpus, message",
    [
        (
            ["hydra.launcher.gpus_per_node=2", "hydra.launcher.tasks_per_node=1"],
            "0,1",
            "tasks_per_node=1 but gpus_per_node=2",
        ),
        (["hydra.launcher.gpus_per_node=2"], "", "hydra.launcher.gpus_per_node=2 but this machine shows no GPU"),
        (["hydra.launcher.tasks_per_node=3"], "", "schedule.batch_size=32 is not divisible by the 3 ranks"),
    ],
)
def test_bad_launcher_settings_are_one_line_before_submission(tmp_path, args, gpus, message):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus}
    result = _multirun(tmp_path, "hydra/launcher=local", *args, timeout=120, env=env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "sweep" / ".submitit").exists() or not any((tmp_path / "sweep" / ".submitit").iterdir())


@pytest.mark.slurm
@needs_slurm
def test_unknown_partition_shows_slurms_own_error(tmp_path):
    result = _multirun(tmp_path, "hydra/launcher=slurm", "hydra.launcher.partition=nosuchpartition", timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nosuchpartition" in lines[0] and "SLURM" in lines[0], result.stderr


@pytest.mark.heavy
@pytest.mark.slurm
@needs_slurm
def test_two_point_multirun_with_two_tasks_per_job_on_slurm(tmp_path):
    result = _multirun(
        tmp_path,
        "hydra/launcher=slurm",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.cpus_per_task=1",
        "seed=0,1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The SQLite store of these tests is fine on one machine; on a cluster the launcher says why not, once.
    assert result.stdout.count("is an SQLite file") == 1 and "tracking=server" in result.stdout, result.stdout
    client, runs = _runs(tmp_path)
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
        assert 0 <= run.data.metrics["eval/linear_acc"] <= 1
    # One job per sweep point (a job array), each with a log pair per rank.
    job_folders = [p for p in (tmp_path / "sweep" / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)]
    assert len(job_folders) == 2
    assert all(len(list(folder.glob("*_log.out"))) == 2 for folder in job_folders)


@pytest.mark.heavy
@pytest.mark.slurm
@needs_slurm
def test_preempted_slurm_job_is_requeued_and_resumes_without_duplicates(tmp_path):
    driver = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "launch.py"),
            "-m",
            "experiment=demo",
            *SMOKE,
            TRACK,
            "dataset.train_size=192",
            "schedule.epochs=4",
            "schedule.checkpoint_every=1",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_location={tmp_path}/artifacts",
            f"hydra.sweep.dir={tmp_path}/sweep",
            "hydra/launcher=slurm",
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.name=soda-requeue-test",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        checkpoint = tmp_path / "sweep" / "0" / "checkpoints" / "last.pt"
        deadline = time.monotonic() + 240
        while not checkpoint.exists() and time.monotonic() < deadline:
            time.sleep(1)
        assert checkpoint.exists(), "the job never wrote its first checkpoint"
        job = squeue("-n", "soda-requeue-test", "-o", "%i").split()[0]
        preempt(job)
        release_requeued(job)
        output, _ = driver.communicate(timeout=420)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output[-3000:]
    client, (run,) = _runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags.get("resumed") == "true"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/knn_acc")] == [0, 1, 2, 3, 4]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 24


def test_rank_0_refuses_to_host_a_rendezvous_at_an_address_its_node_lacks(monkeypatch):
    from soda import dist
    from soda.errors import RendezvousError

    monkeypatch.setenv("MASTER_ADDR", "203.0.113.7")  # TEST-NET-3: no machine has it
    monkeypatch.setenv("MASTER_PORT", "29411")
    with pytest.raises(RendezvousError) as refused:
        dist.check_rendezvous(0, timeout_s=5)
    assert re.fullmatch(
        r"rank 0 on \S+ cannot host the rendezvous at 203\.0\.113\.7:29411 \(MASTER_ADDR:MASTER_PORT\): "
        r"203\.0\.113\.7 is not an address of this node \(.+\); MASTER_ADDR must name rank 0's node, .*",
        str(refused.value),
    ), str(refused.value)
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    dist.check_rendezvous(0, timeout_s=5)  # its own address: nothing to say


def test_a_rank_gives_up_on_an_unreachable_rendezvous_after_its_timeout(monkeypatch):
    from soda import dist
    from soda.errors import RendezvousError

    port = free_port()  # nothing listens there
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    started = time.monotonic()
    with pytest.raises(RendezvousError) as refused:
        dist.check_rendezvous(2, timeout_s=2)
    assert 2 <= time.monotonic() - started < 10
    assert re.fullmatch(
        rf"rank 2 on \S+ could not reach the rendezvous at 127\.0\.0\.1:{port} \(MASTER_ADDR:MASTER_PORT\) within "
        r"2 s: Connection refused; .*",
        str(refused.value),
    ), str(refused.value)


def test_a_rank_waits_for_a_rendezvous_that_starts_late(monkeypatch):
    import socket
    import threading

    from soda import dist

    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    timer = threading.Timer(1.5, lambda: (server.bind(("127.0.0.1", port)), server.listen()))
    timer.start()
    try:
        dist.check_rendezvous(1, timeout_s=30)  # refused at first, then accepted
    finally:
        timer.join()
        server.close()


def test_a_network_interface_the_node_lacks_is_one_line(monkeypatch):
    from soda import dist
    from soda.errors import RendezvousError

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "nosuch0")
    with pytest.raises(RendezvousError, match=r"GLOO_SOCKET_IFNAME=nosuch0 names no network interface of this node"):
        dist._check_network_interface(1)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "^docker,lo")  # NCCL's own forms are NCCL's to check
    dist._check_network_interface(1)


def test_slurm_jobs_set_threads_from_their_cpus_and_the_chosen_interface():
    from launching.submission import node_environment

    threads, interface = node_environment({"network_interface": "ib0"})
    for cpus, preset, expected in (("4", None, "4"), (None, None, None), ("4", "2", "2")):
        env = {k: v for k, v in {"SLURM_CPUS_PER_TASK": cpus, "OMP_NUM_THREADS": preset}.items() if v}
        shown = subprocess.run(
            ["bash", "-c", f'{threads}; echo "${{OMP_NUM_THREADS-unset}}"'],
            env={"PATH": os.environ["PATH"], **env},
            capture_output=True,
            text=True,
            check=True,
        )
        assert shown.stdout.strip() == (expected or "unset")
    assert interface == "export GLOO_SOCKET_IFNAME=ib0 NCCL_SOCKET_IFNAME=ib0"
    assert node_environment({"network_interface": None}) == [threads]
