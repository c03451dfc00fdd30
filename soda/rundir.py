"""A run directory has one owner and one set of settings.

- **One owner.** The process training into a run directory holds `<run_dir>/.soda-lock`, which
  names it (host, pid, the process's start time, its SLURM job). A second launch into a locked
  directory stops with one line naming the owner. A lock whose owner is gone is stale and taken
  over: on the same host the pid is checked; a requeued SLURM job recognises its own earlier
  incarnation; on another host the owner refreshes the lock's time every HEARTBEAT_SECONDS, and
  a lock not refreshed for STALE_AFTER_SECONDS is stale.
- **One set of settings.** `<run_dir>/config.yaml` holds the resolved settings the run started
  with (what its MLflow run's params and config.yaml artifact say). A re-run of the directory
  resumes only with the same settings; the keys of RESUMABLE_CHANGES may differ (recorded on the
  MLflow run), any other difference stops the launch before any work. Hydra's `.hydra/` folder
  describes the latest launch, refused ones included; `config.yaml` describes the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from soda.errors import RunDirError
from soda.files import write_atomically
from soda.tracking import flatten, redact

LOCK_FILE = ".soda-lock"
CONFIG_FILE = "config.yaml"
HEARTBEAT_SECONDS = 60.0
STALE_AFTER_SECONDS = 600.0  # a lock on another host not refreshed for this long is stale

# What may differ when a run directory is re-run: how long to train and how often to evaluate,
# checkpoint and log. None of them changes what one optimiser step does.
RESUMABLE_CHANGES = (
    "schedule.epochs",
    "schedule.train_seconds",
    "schedule.checkpoint_every",
    "schedule.log_every",
    "eval.every",
    "eval.every_seconds",
)
# The sweeper's own settings, which a trial's config carries but which do not shape the run.
NOT_RUN_SETTINGS = ("sweep.n_jobs", "sweep.n_trials", "sweep.max_failure_rate")


def resolved_settings(cfg: DictConfig) -> dict:
    """The run's resolved config without Hydra's node, with no password in a store URL."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    if isinstance(resolved.get("sweep"), dict):
        resolved["sweep"]["storage"] = redact(str(resolved["sweep"]["storage"]))
    return resolved


def _unwritable(run_dir: Path, error: OSError) -> RunDirError:
    reason = error.strerror or type(error).__name__
    return RunDirError(
        f"cannot write run directory {run_dir} ({reason}); make it writable, or give the run "
        f"another directory (hydra.run.dir=... / hydra.sweep.dir=...)"
    )


def _shown(keys: list[str], before: dict[str, str], now: dict[str, str]) -> list[str]:
    """ "key: old -> new" for each differing key; another option of a config group is shown as
    the group's change (`augmentation: seed -> none`), not as every value it brought."""
    groups = sorted(k[: -len(".name")] for k in keys if k.endswith(".name"))
    groups = [g for g in groups if not any(g.startswith(f"{outer}.") for outer in groups)]
    shown = [f"{g}: {before.get(f'{g}.name', '(none)')} -> {now.get(f'{g}.name', '(none)')}" for g in groups]
    for key in keys:
        if not any(key.startswith(f"{g}.") for g in groups):
            shown.append(f"{key}: {before.get(key, '(none)')} -> {now.get(key, '(none)')}")
    return shown


# ---------------------------------------------------------------------------------------------
# The owner.


def _process_started(pid: int) -> float | None:
    """When process `pid` started (to tell it from a later process given the same pid)."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _owner_record(token: str) -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_started": _process_started(os.getpid()),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "token": token,
    }


def _read_owner(path: Path) -> dict | None:
    """The lock's owner; None when the lock is gone. An unreadable lock (a writer killed while
    writing is not possible, see claim; a damaged file is) counts as an unknown, stale owner."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _stale(owner: dict, lock: Path) -> bool:
    """Has the owner of `lock` gone away?"""
    if not owner or "pid" not in owner:
        return True
    if owner.get("host") == socket.gethostname():
        if owner["pid"] == os.getpid():
            return True  # this process, from an earlier run() that did not return
        started = _process_started(int(owner["pid"]))
        recorded = owner.get("process_started")
        return started is None or (recorded is not None and abs(started - recorded) > 1.0)
    job = os.environ.get("SLURM_JOB_ID")
    if job and owner.get("slurm_job") == job:
        return True  # our own job's earlier incarnation, before it was requeued
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return True
    return age > STALE_AFTER_SECONDS


def _describe(owner: dict) -> str:
    job = f", SLURM job {owner['slurm_job']}" if owner.get("slurm_job") else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}{job}, since {owner.get('started')}"


class RunDirectory:
    """The run directory, claimed for this process (`claim`) until `release`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock = self.path / LOCK_FILE
        self.token = secrets.token_hex(8)
        self.previous_owner: dict | None = None  # a stale owner this process took over from
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def claim(self) -> None:
        """Make the directory and take its lock, or stop with one line naming its owner."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._take()
        except OSError as error:
            raise _unwritable(self.path, error) from None
        self._heartbeat = threading.Thread(target=self._beat, name="run-dir-lock", daemon=True)
        self._heartbeat.start()

    def _take(self) -> None:
        # The record is complete before the lock exists: written to a file of our own, then
        # linked to the lock's name, which fails if the lock exists (atomic, also on NFS).
        mine = self.path / f".soda-lock.{self.token}.tmp"
        mine.write_text(json.dumps(_owner_record(self.token)))
        try:
            for _ in range(3):
                try:
                    os.link(mine, self.lock)
                    return
                except FileExistsError:
                    pass
                owner = _read_owner(self.lock)
                if owner is None:
                    continue  # released meanwhile
                if not _stale(owner, self.lock):
                    raise RunDirError(
                        f"run directory {self.path} is in use by {_describe(owner)}; wait for that run to end, "
                        f"or give this one another directory (hydra.run.dir=...)"
                    )
                self._take_over(owner)
            raise RunDirError(f"run directory {self.path}: could not take its lock {self.lock}; try again")
        finally:
            mine.unlink(missing_ok=True)

    def _take_over(self, owner: dict) -> None:
        """Remove a stale lock, unless another process took it over first (then the next try
        sees that process as the owner)."""
        if _read_owner(self.lock) == owner:
            with contextlib.suppress(FileNotFoundError):
                self.lock.unlink()
            self.previous_owner = owner

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                os.utime(self.lock)

    def release(self) -> None:
        """Give the lock up (only if it is still ours)."""
        self._stop.set()
        owner = _read_owner(self.lock)
        if owner and owner.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.lock.unlink()

    # -----------------------------------------------------------------------------------------
    # The settings.

    def saved_settings(self) -> dict | None:
        """The resolved settings this directory's run started with; None for a new directory."""
        path = self.path / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            return OmegaConf.to_container(OmegaConf.load(path))
        except Exception:
            raise RunDirError(
                f"{path} is unreadable: it should hold the settings this run started with; restore it, "
                f"or start a new run in another directory"
            ) from None

    def check_settings(self, settings: dict) -> dict[str, tuple[str, str]]:
        """{key: (started with, now)} for the resumable keys that changed; RunDirError, before
        any work, when any other setting differs from what the run started with."""
        saved = self.saved_settings()
        if saved is None:
            return {}
        before, now = flatten(saved), flatten(settings)
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and k not in NOT_RUN_SETTINGS)
        refused = [k for k in changed if k not in RESUMABLE_CHANGES]
        if refused:
            shown = _shown(refused, before, now)
            more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
            shown = ", ".join(shown[:5])
            raise RunDirError(
                f"run directory {self.path} holds a run started with other settings ({shown}{more}); "
                f"re-run with its settings to resume it (only {', '.join(RESUMABLE_CHANGES)} may change), "
                f"or start a new run in another directory"
            )
        return {k: (before.get(k, "(none)"), now.get(k, "(none)")) for k in changed}

    def save_settings(self, settings: dict) -> None:
        """Record the settings the run trains with (at its first start, and after an allowed
        change): written atomically, so a crash leaves the previous version."""
        text = OmegaConf.to_yaml(OmegaConf.create(settings))
        try:
            write_atomically(self.path / CONFIG_FILE, lambda handle: handle.write(text.encode()))
        except OSError as error:
            raise _unwritable(self.path, error) from None
