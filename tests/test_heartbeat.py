"""soda.heartbeat: a peer whose beat stops is named within peer_timeout_s; a live peer or one
that stopped on purpose never is. A frozen rank of a real job: tests/system/test_frozen.py."""

from __future__ import annotations

import os
import socket
import time

from soda.heartbeat import BEATS_DIR, Heartbeat, PeerStalled


def _watch(run_dir, rank: int, timeout: float = 1.0):
    seen: list[tuple[PeerStalled, float]] = []
    heartbeat = Heartbeat(run_dir, rank, 2, timeout, lambda stalled: seen.append((stalled, time.monotonic())))
    return heartbeat, seen


def test_a_peer_that_stops_beating_is_named_after_the_timeout(tmp_path):
    (tmp_path / BEATS_DIR).mkdir()
    (tmp_path / BEATS_DIR / "rank1").write_text("node-7 4242 3\n")  # beat once, then frozen
    heartbeat, seen = _watch(tmp_path, 0)
    started = time.monotonic()
    heartbeat.start()
    deadline = started + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    heartbeat.stop()
    [(stalled, when)] = seen
    assert 1.0 <= when - started < 2.5
    assert stalled.rank == 1
    message = str(stalled)
    assert message.startswith("rank 1 on node-7 (pid 4242) made no progress for 1 s") and "\n" not in message


def test_live_peers_and_peers_that_finished_are_not_stalled(tmp_path):
    first, seen_first = _watch(tmp_path, 0)
    second, seen_second = _watch(tmp_path, 1)
    first.start()
    second.start()
    time.sleep(3)
    assert seen_first == [] and seen_second == []
    second.stop()  # finished: its file says so
    assert (tmp_path / BEATS_DIR / "rank1").read_text().split() == [socket.gethostname(), str(os.getpid()), "done"]
    time.sleep(2.5)
    first.stop()
    assert seen_first == []


# Run as `python -c RANK_SCRIPT` by both a frozen peer and its watcher: one command line, as ranks have.
RANK_SCRIPT = """
import os, pathlib, time
if os.environ["ROLE"] == "frozen":
    time.sleep(60)
else:
    from soda.heartbeat import Heartbeat
    Heartbeat(pathlib.Path(os.environ["RUN_DIR"]), 0, 2, 1.0, print).kill_if_here(1)
"""


def test_a_frozen_peer_on_this_host_is_killed_but_never_a_stranger_with_its_pid(tmp_path):
    import signal
    import subprocess
    import sys

    (tmp_path / BEATS_DIR).mkdir()
    env = {**os.environ, "RUN_DIR": str(tmp_path)}

    def watcher_kills(pid: int) -> None:
        (tmp_path / BEATS_DIR / "rank1").write_text(f"{socket.gethostname()} {pid} 3\n")
        subprocess.run([sys.executable, "-c", RANK_SCRIPT], env={**env, "ROLE": "watcher"}, check=True, timeout=60)

    frozen = subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], env={**env, "ROLE": "frozen"})
    stranger = subprocess.Popen(["sleep", "60"])  # e.g. given the pid of a peer that died
    try:
        watcher_kills(stranger.pid)
        watcher_kills(frozen.pid)
        assert frozen.wait(timeout=10) == -signal.SIGKILL
        assert stranger.poll() is None
    finally:
        for process in (frozen, stranger):
            process.kill()
            process.wait()
