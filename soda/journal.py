"""Optuna's journal file (the default sweep storage), made safe against a writer that died in the
middle of a write.

The journal is one JSON record per line, appended under a lock file (JournalFileOpenLock:
`<journal>.lock`, made with O_CREAT|O_EXCL). A writer killed mid-append (SIGKILL, a lost node, a
full disk) leaves a torn last line. Optuna's reader skips a last line without its newline, so the
study reads as it was before that write; but Optuna's next append lands on the torn bytes, the two
make one invalid line, and from then on no process can read the study (JSONDecodeError, or for a
new study "Should not reach").

So every append here first cuts a torn tail back to the last complete line, under the same lock,
keeping the cut bytes in `<journal>.torn-<time>` and saying so in one warning; and a journal is
checked when it is opened: a damaged last line (torn, or a torn one an older writer appended to)
is cut the same way, a damaged line with lines after it (which Optuna cannot read past) is refused
in one line that says how to fix it. Cutting loses nothing anyone has read: no reader applied a
line that is not whole, valid JSON, nor anything after it.

The one dependency on Optuna's internals: the line format (one `json.dumps` record per line, as
JournalFileBackend.append_logs writes it). tests/test_sweep_faults.py reads journals written here
with Optuna's own reader, and fails if that format changes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from soda.errors import SweepError

log = logging.getLogger(__name__)

TORN_SUFFIX = ".torn-"  # <journal>.torn-<UTC time>: the bytes a repair cut off
CHUNK = 1 << 16


class JournalDamaged(SweepError):
    """A journal damaged before its last line: Optuna cannot read the study past it."""


class HealingJournalBackend(JournalFileBackend):
    """Optuna's JournalFileBackend with JournalFileOpenLock, whose appends first cut a torn tail."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = JournalFileOpenLock(str(self.path))
        super().__init__(str(self.path), lock_obj=self.lock)

    def heal(self) -> None:
        """Check the whole journal (see the module docstring): cut a damaged last line under the
        lock, refuse (JournalDamaged) a damaged line that has lines after it."""
        damage = _damage(self.path.read_bytes())
        if damage is None:
            return
        self.lock.acquire()  # the last line may be a write in progress: decide under the lock
        try:
            data = self.path.read_bytes()
            damage = _damage(data)
            if damage is None:
                return
            offset, number, after = damage
            if after:
                raise JournalDamaged(
                    f"Optuna journal {self.path}: line {number} is not a whole record and {after} more line(s) "
                    f"follow it, which Optuna cannot read past; keep a copy, cut the file before that line "
                    f"(head -n {number - 1} {self.path} > {self.path}.fixed && mv {self.path}.fixed {self.path}) "
                    f"and re-run: the records from line {number} on are lost"
                )
            _cut(self.path, offset, data[offset:])
        finally:
            self.lock.release()

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        # As Optuna's append, with the torn tail cut first under the same lock: a line appended to
        # torn bytes would make both unreadable.
        text = "".join(json.dumps(entry, separators=(",", ":")) + "\n" for entry in logs).encode("utf-8")
        self.lock.acquire()
        try:
            _cut_torn_tail(self.path)
            with open(self.path, "ab") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            self.lock.release()


def _damage(data: bytes) -> tuple[int, int, int] | None:
    """(byte offset, 1-based line number, lines after it) of the first line that is not a whole
    record (valid JSON ending in a newline), or None when every line is one."""
    offset = 0
    lines = data.split(b"\n")
    complete = lines[:-1]  # the last piece has no newline: empty, or torn
    for index, line in enumerate(complete):
        if not _record(line):
            return offset, index + 1, len(complete) - index - 1 + bool(lines[-1])
        offset += len(line) + 1
    if lines[-1]:
        return offset, len(complete) + 1, 0
    return None


def _record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError, or UnicodeDecodeError in a multi-byte character cut in two
        return False


def _cut_torn_tail(path: Path) -> None:
    """Cut the bytes after the journal's last newline (a write that never finished); the caller
    holds the lock. Reads only the end of the file."""
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        end = size
        tail = b""
        while end > 0:  # back to the last newline, a chunk at a time
            start = max(0, end - CHUNK)
            handle.seek(start)
            tail = handle.read(end - start) + tail
            newline = tail.rfind(b"\n")
            if newline >= 0:
                _cut(path, start + newline + 1, tail[newline + 1 :])
                return
            end = start
        _cut(path, 0, tail)


def _cut(path: Path, offset: int, removed: bytes) -> None:
    """Truncate the journal at `offset`, keeping `removed` (what was there) in a side file."""
    side = Path(f"{path}{TORN_SUFFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    with open(side, "ab") as handle:
        handle.write(removed)
        handle.flush()
        os.fsync(handle.fileno())
    os.truncate(path, offset)
    log.warning(
        "Optuna journal %s: cut %d bytes of a record whose writer stopped mid-write (the study is as it was "
        "before that write); the bytes are in %s",
        path,
        len(removed),
        side,
    )
