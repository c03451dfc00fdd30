"""The owner-named lock (soda.files.OwnerLock), with fake owner records: which owners are gone,
and what taking and giving up the lock does to the file."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import psutil
import pytest

from soda.files import LockContended, OwnerLock

HERE = socket.gethostname()
NO_SUCH_PID = 2**22 + 1  # above the largest pid Linux and macOS give out


def _lock(tmp_path: Path, requeue_takes_over: bool = False, **owner) -> OwnerLock:
    """A lock held by `owner` (the fields of its record), as this process sees it."""
    lock = OwnerLock(
        tmp_path / "the.lock", refresh_seconds=60, stale_after_seconds=600, requeue_takes_over=requeue_takes_over
    )
    if owner:
        lock.path.write_text(json.dumps(owner))
    return lock


def _alive() -> dict:
    """A live process of this host other than this one: our parent, with its start time."""
    parent = os.getppid()
    return {"host": HERE, "pid": parent, "process_started": psutil.Process(parent).create_time(), "token": "theirs"}


def test_an_owner_on_this_host_is_gone_when_its_pid_has_ended_or_is_another_process(tmp_path):
    lock = _lock(tmp_path)
    assert not lock.stale(_alive())
    assert lock.stale({**_alive(), "pid": NO_SUCH_PID})
    # The pid runs, but it was given to a process that started later than the lock's owner.
    assert lock.stale({**_alive(), "process_started": _alive()["process_started"] - 100})
    # A record naming this process that is not held by this lock: an earlier holder never let go.
    assert lock.stale({"host": HERE, "pid": os.getpid()})
    assert lock.stale({}) and lock.stale({"host": HERE})  # unreadable, or naming no process


def test_an_owner_on_another_host_is_gone_once_the_lock_is_no_longer_touched(tmp_path):
    lock = _lock(tmp_path, host="elsewhere", pid=4242)
    assert not lock.stale(lock.owner())
    old = time.time() - lock.stale_after_seconds - 60
    os.utime(lock.path, (old, old))
    assert lock.stale(lock.owner())


def test_a_lock_of_our_own_slurm_job_is_gone_only_where_a_requeue_takes_over(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "981")
    record = {"host": "node-17", "pid": 4242, "slurm_job": "981"}
    assert _lock(tmp_path, requeue_takes_over=True, **record).stale(record)  # our job, before its requeue
    assert not _lock(tmp_path, requeue_takes_over=False, **record).stale(record)  # a rank of our job on node-17
    monkeypatch.setenv("SLURM_JOB_ID", "982")
    assert not _lock(tmp_path, requeue_takes_over=True, **record).stale(record)  # another job


def test_a_live_owner_keeps_the_lock(tmp_path):
    owner = _alive()
    lock = _lock(tmp_path, **owner)
    assert lock.try_acquire() == owner
    assert lock.owner() == owner and lock.previous_owner is None
    lock.release()  # not ours: left alone
    assert lock.owner() == owner
    assert [p.name for p in tmp_path.iterdir()] == ["the.lock"], "a temporary record was left"


def test_a_stale_lock_is_taken_over_and_released(tmp_path):
    gone = {"host": HERE, "pid": NO_SUCH_PID, "token": "theirs"}
    lock = _lock(tmp_path, **gone)
    assert lock.try_acquire() is None
    try:
        assert lock.previous_owner == gone
        record = lock.owner()
        assert (record["host"], record["pid"], record["token"]) == (HERE, os.getpid(), lock.token)
        assert record["process_started"] == psutil.Process().create_time()
    finally:
        lock.release()


def test_release_removes_only_our_own_lock(tmp_path):
    lock = _lock(tmp_path)
    assert lock.try_acquire() is None
    lock.release()
    assert not lock.path.exists()

    assert lock.try_acquire() is None
    taken_over = {**_alive(), "token": "theirs"}  # while we were away: ours was judged stale
    lock.path.write_text(json.dumps(taken_over))
    lock.release()
    assert lock.owner() == taken_over


def test_the_holder_keeps_touching_its_lock(tmp_path):
    lock = OwnerLock(tmp_path / "the.lock", refresh_seconds=0.05, stale_after_seconds=600)
    assert lock.try_acquire() is None
    try:
        old = time.time() - 3600
        os.utime(lock.path, (old, old))
        deadline = time.monotonic() + 5
        while time.time() - lock.path.stat().st_mtime > 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert time.time() - lock.path.stat().st_mtime < 60
    finally:
        lock.release()
    assert not lock.path.exists()


def test_a_lock_that_keeps_changing_hands_is_reported(tmp_path, monkeypatch):
    lock = _lock(tmp_path, **_alive())
    monkeypatch.setattr(lock, "owner", lambda: None)  # let go each time, before we could look
    with pytest.raises(LockContended, match="the.lock"):
        lock.try_acquire()
    assert [p.name for p in tmp_path.iterdir()] == ["the.lock"]


def test_an_unwritable_folder_is_an_os_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        OwnerLock(blocker / "the.lock", refresh_seconds=60, stale_after_seconds=600).try_acquire()
