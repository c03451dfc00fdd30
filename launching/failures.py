"""How a job that handed back no result ended, in one line: its preflight line when that stopped
it, else the rank that failed first (from the tasks' logs) and its log; and whether it failed or
was stopped from outside (Ctrl-C, SIGTERM, a preemption, a cancel)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from launching import slurm

# What a SLURM job's preflight line prints when it fails, first (the launcher finds it in the job's log).
PREFLIGHT = "soda preflight"
# How a job that handed back no result was stopped from outside (Ctrl-C, SIGTERM, a preemption's
# exit, a cancel), by the exception line of its log or by its scheduler state.
_STOPPED_LINE = re.compile(r"^(KeyboardInterrupt|(soda\.errors\.)?Terminated|SystemExit: preempted)\b")
_STOPPED_STATES = ("CANCELLED", "INTERRUPTED", "PREEMPTED", "NODE_FAIL", "DEADLINE")
# A rank's error that only says another rank went away (its socket closed, a collective timed out).
_PEER_ERROR = re.compile(
    r"Connection (reset|closed) by peer|Broken pipe|Socket Timeout|DistNetworkError|collective operation timeout"
    r"|NCCL communicator was aborted"
)
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[,.]\d+)?")


def job_failure(job, error: Exception) -> str:
    """One line on a job that ended without a result: its preflight line when that stopped it, else
    the rank that failed first and its log."""
    preflight = preflight_failure(job)
    if preflight is not None:
        return f"job {job.job_id}: {preflight[0]}"
    tasks = [job.task(number) for number in range(job.num_tasks)]
    story = rank_failure([[task.paths.stderr, task.paths.stdout] for task in tasks])
    if story is not None:
        return story if len(tasks) > 1 else story.replace("rank 0 failed", f"job {job.job_id} failed", 1)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"job {job.job_id} ended without a result and no rank logged an error ({first}); logs: {job.paths.folder}"


def crash(job, error: Exception) -> tuple:
    """("failed" | "stopped", the exception line of the rank that failed first, that rank's log)
    for a job that handed back no result (or its preflight line, when that stopped it)."""
    preflight = preflight_failure(job)
    if preflight is not None:
        return "failed", *preflight
    tasks = [job.task(number) for number in range(job.num_tasks)]
    failure = first_failure([[task.paths.stderr, task.paths.stdout] for task in tasks])
    if failure is not None:
        who, _, _, line, log_path = failure
        line = line if len(tasks) == 1 else f"{line} ({who})"
    else:
        line, log_path = (str(error).strip().splitlines() or [type(error).__name__])[0], tasks[0].paths.stdout
    state = slurm.final_state(job.job_id)  # scontrol's, when sacct could not tell
    if state is None:
        try:
            state = str(job.state).split()[0].upper()
        except Exception:  # a scheduler that cannot be asked now: the log decides
            state = ""
    stopped = bool(_STOPPED_LINE.search(line)) or state in _STOPPED_STATES
    return ("stopped" if stopped else "failed"), line, log_path


def preflight_failure(job) -> tuple | None:
    """(the preflight line, the log holding it) when the job's batch script stopped there, or None.
    The batch script writes to task 0's logs, and its last line is then the preflight's; only the
    end of each log is read, as this runs for every waiting job at each poll."""
    task = job.task(0)
    for path in (task.paths.stderr, task.paths.stdout):
        try:
            with open(path, "rb") as log_file:
                log_file.seek(max(0, log_file.seek(0, os.SEEK_END) - 4096))
                lines = log_file.read().decode(errors="replace").splitlines()
        except OSError:
            continue
        if lines and lines[-1].startswith(PREFLIGHT):
            return lines[-1].strip(), path
    return None


def rank_failure(task_logs: Sequence[Sequence[Path]]) -> str | None:
    """`rank <r> failed: <its exception line>; full log: <file>` from each rank's log files
    (`task_logs[rank]`: submitit's .err and .out of that task), or None when no rank logged a
    traceback. When one rank dies the others often fail too, on a socket their peer closed: the
    rank blamed is the one whose error is not such a consequence, and the earliest logged."""
    failure = first_failure(task_logs)
    if failure is None:
        return None
    who, _, _, line, path = failure
    return f"{who} failed: {line}; full log: {path}"


def first_failure(task_logs: Sequence[Sequence[Path]]) -> tuple | None:
    """(`rank <r>` or `ranks <r>, <s>`, when, rank, exception line, file) of the rank to blame
    (rank_failure), or None when no rank logged a traceback."""
    failures = []  # (is a peer's consequence, when, rank, exception line, file)
    for rank, paths in enumerate(task_logs):
        for path in paths:
            found = _last_exception(path)
            if found is not None:
                when, line = found
                failures.append((bool(_PEER_ERROR.search(line)), when, rank, line[:300], path))
                break
    if not failures:
        return None
    failures.sort(key=lambda failure: (failure[0], failure[1] or "~", failure[2]))
    _, when, first_rank, line, path = failures[0]
    alike = sorted({failure[2] for failure in failures if failure[3] == line} | {first_rank})
    who = f"rank {first_rank}" if len(alike) == 1 else f"ranks {', '.join(map(str, alike))}"
    return who, when, first_rank, line, path


def _last_exception(path: Path) -> tuple | None:
    """(the timestamp logged just before it or None, the exception line) of the last traceback
    in a log file, or None when it holds none."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    starts = [n for n, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if not starts:
        return None
    start = starts[-1]
    # The frames are indented; the first line that is not is the exception (a chained traceback's
    # last one is the exception that ended the program).
    line = next((text for text in lines[start + 1 :] if text.strip() and not text[0].isspace()), None)
    if line is None:
        return None
    stamp = _TIMESTAMP.search(lines[start - 1]) if start > 0 else None
    return (stamp[0].replace("T", " ").replace(".", ",") if stamp else None), line.strip()
