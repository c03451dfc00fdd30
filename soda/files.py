"""Files that several processes, or a restart after a crash, see whole.

- `write_atomically`: a reader, or a restart after a crash, sees the old file or the new one,
  never part of one.
- `OwnerLock`: a lock file that names its owner, so that a lock whose owner is gone is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import psutil


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object], fsync: bool = False) -> None:
    """`write(handle)` fills a temporary file in `path`'s folder (named `.<name>.*.tmp`), which
    then replaces `path`. On any failure the temporary file is removed and `path` is unchanged.
    A write the operating system refuses (full disk, quota, `ulimit -f`, read-only folder) is
    raised as its OSError, also where the writer hid it: torch.save reports a failed write as
    RuntimeError "unexpected pos ...", with the OSError only as that error's context. A Ctrl-C
    or SIGTERM that torch.save hid the same way is raised as what it is.
    The file keeps the mode it had, or gets the one open() gives a new file (mkstemp's private
    0600 would otherwise become the file's)."""
    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask()
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            write(handle)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        refused = _cause(error)
        if refused is None or refused is error:
            raise
        raise refused from None


def _cause(error: BaseException | None) -> BaseException | None:
    """The OSError, or the stop from outside (Ctrl-C, SIGTERM), that `error` hides, if any."""
    from soda.errors import Terminated

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        if isinstance(error, KeyboardInterrupt | Terminated):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------
# A lock file that names its owner.


class LockContended(Exception):
    """The lock changed hands each time we tried to take it."""


class OwnerLock:
    """A lock file that names its owner, so that a lock whose owner is gone can be taken over.

    The lock holds a JSON record: host, pid, the process's start time, when it took the lock,
    its SLURM job and a token of this object. The record is complete before the lock exists:
    written to a file of our own, then linked to the lock's name, which fails if the lock exists
    (atomic, also on NFS). While held, a thread touches the lock every `refresh_seconds`.

    An owner is gone (`stale`) when its record is unreadable or names no pid, or:
    - on this host, when its pid is this process (a holder in this process that never let go),
      has ended, or belongs to a later process (another start time);
    - with `requeue_takes_over`, when it names this process's SLURM job: the job's own earlier
      incarnation, before a requeue. Only for a lock that one process per job takes; the ranks of
      a job on several nodes share its id;
    - on another host, when the lock has not been touched for `stale_after_seconds`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        refresh_seconds: float,
        stale_after_seconds: float,
        requeue_takes_over: bool = False,
    ):
        self.path = Path(path)
        self.refresh_seconds = refresh_seconds
        self.stale_after_seconds = stale_after_seconds
        self.requeue_takes_over = requeue_takes_over
        self.token = secrets.token_hex(8)
        self.previous_owner: dict | None = None  # the stale owner this lock was taken over from
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def try_acquire(self) -> dict | None:
        """Take the lock, taking a stale one over: None once it is ours (until `release`), else
        its live owner. OSError where it cannot be written (a read-only folder, a full disk);
        LockContended where it came and went each time."""
        mine = self.path.with_name(f"{self.path.name}.{self.token}.tmp")
        try:
            mine.write_text(json.dumps(_owner_record(self.token)))
            for _ in range(3):
                try:
                    os.link(mine, self.path)
                except FileExistsError:
                    owner = self.owner()
                    if owner is None:
                        continue  # released meanwhile
                    if not self.stale(owner):
                        return owner
                    self.take_over(owner)
                else:
                    self._stop.clear()
                    self._heartbeat = threading.Thread(target=self._beat, name=self.path.name, daemon=True)
                    self._heartbeat.start()
                    return None
        finally:
            mine.unlink(missing_ok=True)
        raise LockContended(f"could not take the lock {self.path}: it changed hands each time")

    def owner(self) -> dict | None:
        """The lock's owner record; None when there is no lock. An unreadable record (a damaged
        file: a record is complete from the start) is {}, an unknown owner, which is stale."""
        try:
            record = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def stale(self, owner: dict) -> bool:
        """Has `owner`, this lock's owner, gone away?"""
        if not isinstance(owner.get("pid"), int):
            return True
        if owner.get("host") == socket.gethostname():
            return owner["pid"] == os.getpid() or not _running(owner["pid"], owner.get("process_started"))
        job = os.environ.get("SLURM_JOB_ID")
        if self.requeue_takes_over and job and owner.get("slurm_job") == job:
            return True
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > self.stale_after_seconds

    def take_over(self, owner: dict) -> None:
        """Remove the lock of `owner`, who is gone, unless another process took it over first
        (then the next try sees that process as the owner)."""
        if self.owner() == owner:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.previous_owner = owner

    def release(self) -> None:
        """Stop touching the lock and remove it, if it is still ours (not taken over from us)."""
        if self._heartbeat is None:
            return
        self._stop.set()
        self._heartbeat.join()
        self._heartbeat = None
        owner = self.owner()
        if owner and owner.get("token") == self.token:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _beat(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            with contextlib.suppress(OSError):
                os.utime(self.path)


def describe(owner: dict) -> str:
    """The owner of a lock, for a message: "pid 4242 on node-17, SLURM job 981, since <time>"."""
    job = f", SLURM job {owner['slurm_job']}" if owner.get("slurm_job") else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}{job}, since {owner.get('started')}"


def _owner_record(token: str) -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_started": psutil.Process().create_time(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "token": token,
    }


def _running(pid: int, started: float | None) -> bool:
    """Whether process `pid` of this host runs, and is the one that started at `started` (not a
    later process given the same pid)."""
    try:
        now = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # another user's process that hides its start time: it runs
        return True
    return started is None or abs(now - started) <= 1.0
