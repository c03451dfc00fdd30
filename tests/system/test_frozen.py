"""Campaign `frozen`: one rank of a 2-rank job is stopped (SIGSTOP) mid-run. The job ends within
peer_timeout_s in one line naming the rank and its host, the frozen process is gone, the record
says why, and a re-run resumes from the checkpoint."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

from soda.heartbeat import BEATS_DIR
from soda.loop import CHECKPOINT
from soda.record import ERROR, PREVIOUS_END
from tests.system.campaign import REPO, TINY, Store, environment, launch_command, tracking_overrides

PEER_TIMEOUT_S = 10


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_frozen_rank_ends_the_job_in_one_line_and_the_rerun_resumes(work, record):
    sweep = work / "sweep"
    command = launch_command(
        "-m",
        *TINY,
        "schedule.epochs=3",
        "hydra/launcher=local",
        "hydra.launcher.tasks_per_node=2",
        f"peer_timeout_s={PEER_TIMEOUT_S}",
        *tracking_overrides(work, "frozen"),
        f"hydra.sweep.dir={sweep}",
    )
    run_dir = sweep / "0"
    process = subprocess.Popen(
        command, cwd=REPO, env=environment(work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not (run_dir / CHECKPOINT).exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.2)
    host, pid, _ = (run_dir / BEATS_DIR / "rank1").read_text().split()
    os.kill(int(pid), signal.SIGSTOP)
    stopped = time.monotonic()
    _, stderr = process.communicate(timeout=PEER_TIMEOUT_S + 120)
    waited = time.monotonic() - stopped
    record.facts.append(f"rank 1 of 2 SIGSTOPped after epoch 1: the job ended {waited:.0f} s later")
    assert process.returncode != 0
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr[-3000:]
    assert f"rank 1 on {socket.gethostname()} (pid {pid}) made no progress for {PEER_TIMEOUT_S} s" in lines[0]
    assert waited < PEER_TIMEOUT_S + 60, waited
    assert not _alive(int(pid)), "the frozen rank was left behind"
    store = Store(f"sqlite:///{work}/mlflow.db", "frozen")
    [run] = store.runs_of(run_dir)
    assert run.info.status == "FAILED" and "PeerStalled: rank 1" in run.data.tags[ERROR]

    rerun = subprocess.run(command, cwd=REPO, env=environment(work), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    [run] = store.runs_of(run_dir)
    store.assert_complete(run, epochs=3, what="the job a frozen rank stopped")
    assert run.data.tags[PREVIOUS_END].startswith("failed: PeerStalled: rank 1")
