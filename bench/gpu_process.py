"""A stage's process: run in a process group of its own within the stage's limit, its output in
the stage's log (in $OUT when set) and the log's tail in the record; cut or ended, the whole group
is ended, so that nothing a stage started (DDP ranks, pytest workers) holds the GPU for the next.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the sibling modules below
from gpu_record import Check, Cut

REPO = Path(__file__).resolve().parents[1]


def run_logged(check: Check, name: str, command: list[str], shown: str | None = None) -> int:
    """Run a stage's process in a process group of its own, within the stage's limit: its whole
    output goes to the stage's log (in $OUT when set), its tail into the record. Cut or ended, the
    whole group is ended, grandchildren (DDP ranks, pytest workers) too."""
    limit, by = check.timeout(name)
    if limit < 1:
        raise Cut(f"no time left before {by}")
    entry = check.record["stages"][name]
    log_path = check.log_path(name)
    print(f"   $ {shown or ' '.join(command)}", flush=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            entry["group_ended"] = end_group(process)
            entry["log_tail"] = _tail(log_path)
            raise Cut(f"cut at {by}; its process group was ended") from None
        except BaseException:
            entry["group_ended"] = end_group(process)
            entry["log_tail"] = _tail(log_path)
            raise
    left = end_group(process)  # what a finished stage left behind must not hold the GPU for the next
    if left:
        entry["group_ended"] = left
    entry["log_tail"] = _tail(log_path)
    return returncode


def end_group(process: subprocess.Popen, grace: float = 10.0) -> str | None:
    """End every process of the group the stage's process leads: SIGTERM, then SIGKILL after
    `grace` seconds. Says what it had to do, or None when the group was already gone."""
    group = process.pid

    def alive() -> bool:
        try:
            os.killpg(group, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    if process.poll() is not None and not alive():
        return None
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        pass
    until = time.time() + grace
    while time.time() < until:
        process.poll()
        if not alive():
            process.wait()
            return "SIGTERM"
        time.sleep(0.2)
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    return "SIGKILL"


def _tail(path: Path, lines: int = 25) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def last_line(check: Check, name: str) -> str:
    """The last line a stage's process wrote, for a one-line reason."""
    tail = [line for line in check.record["stages"].get(name, {}).get("log_tail", []) if line.strip()]
    return tail[-1][:300] if tail else "no output"
