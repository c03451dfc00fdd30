"""Frozen peers: a rank that stops (SIGSTOP, a hung node, a machine gone) ends the whole job.

A rank that fails ends the job at once (soda.train.run), but a rank that merely stops leaves the
others waiting in a collective until the process group's timeout (half an hour). So each rank
of a multi-rank job beats from a thread of its own: it rewrites `<run_dir>/.ranks/rank<r>`
(host, pid, a count) every `timeout_s / 10` seconds and reads its peers' files. A peer whose file
has not changed for `timeout_s` (peer_timeout_s) is frozen: the rank that sees it says so in one
line naming the peer's rank and host, records it (rank 0 in MLflow; any rank in the run directory,
soda.tracking.END_FILE), kills the peer when it runs on the same host, and leaves the process.
SLURM's srun, and the local launcher, end the job's other tasks; a requeue or a re-run resumes
from the last checkpoint.

The beat comes from a thread, not from the training loop: it says the process is alive, whatever
its main thread does (an evaluation on rank 0 while the others wait, a checkpoint, compilation).
Staleness is judged by this process's own clock between changes of the peer's file, so clocks of
other hosts (or of a shared file system) never enter.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from soda.errors import SodaError
from soda.files import write_atomically

log = logging.getLogger(__name__)
BEATS_DIR = ".ranks"
DONE = "done"  # the last word of a rank that stopped beating on purpose


class PeerStalled(SodaError):
    """A rank of this job made no heartbeat for peer_timeout_s (`rank`: which)."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


class Heartbeat:
    """This rank's beat and its watch over the others (start() ... stop())."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        world_size: int,
        timeout_s: float,
        on_stall: Callable[[PeerStalled], None],
    ):
        self.folder = Path(run_dir) / BEATS_DIR
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval = max(0.2, timeout_s / 10)
        self.on_stall = on_stall
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"soda-heartbeat-rank{rank}", daemon=True)
        # Per peer: (what its file said last, when this process saw that change).
        self._seen: dict[int, tuple[str | None, float]] = {}

    def start(self) -> Heartbeat:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._beat()
        now = time.monotonic()  # a peer's file from an earlier attempt counts from now
        self._seen = {peer: (self._read(peer), now) for peer in range(self.world_size) if peer != self.rank}
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and watching; the file says this rank is done, so that peers still
        finishing (rank 0 records the end) do not take the silence for a frozen rank."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        text = f"{self.host} {self.pid} {DONE}\n"
        try:
            write_atomically(self._path(self.rank), lambda handle: handle.write(text.encode()))
        except OSError:
            pass

    def _path(self, rank: int) -> Path:
        return self.folder / f"rank{rank}"

    def _beat(self) -> None:
        self._count += 1
        text = f"{self.host} {self.pid} {self._count}\n"
        write_atomically(self._path(self.rank), lambda handle: handle.write(text.encode()))

    def _read(self, rank: int) -> str | None:
        try:
            return self._path(rank).read_text()
        except OSError:
            return None

    def stalled(self) -> PeerStalled | None:
        """The first peer whose beat has not changed for timeout_s, as the error that says so."""
        now = time.monotonic()
        for peer, (last, since) in self._seen.items():
            text = self._read(peer)
            if text != last:
                self._seen[peer] = (text, now)
            elif (text or "").split()[-1:] == [DONE]:
                continue
            elif now - since > self.timeout_s:
                host, pid = _owner(text)
                return PeerStalled(
                    f"rank {peer} on {host} (pid {pid}) made no progress for {self.timeout_s:g} s (peer_timeout_s: "
                    "no heartbeat; stopped, hung or its node lost); the job ends: re-run it (or let SLURM requeue "
                    "it) to resume from the last checkpoint",
                    peer,
                )
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except OSError as error:  # a full or vanished file system: peers will judge this rank
                log.warning("heartbeat of rank %d could not be written: %s", self.rank, error)
            stalled = self.stalled()
            if stalled is not None:
                self.on_stall(stalled)
                return

    def kill_if_here(self, stalled_rank: int) -> None:
        """SIGKILL a frozen peer that runs on this host (a stopped process never exits), when the
        process with its pid runs this job's command line (ranks share one): never a stranger
        that was given the pid of a peer that had died."""
        host, pid = _owner(self._read(stalled_rank))
        if host != self.host or not pid.isdigit():
            return
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() != Path("/proc/self/cmdline").read_bytes():
                return
            os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


def _owner(text: str | None) -> tuple[str, str]:
    parts = (text or "").split()
    return (parts[0], parts[1]) if len(parts) >= 2 else ("an unknown host", "unknown")
