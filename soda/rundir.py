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

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from soda.errors import RunDirError
from soda.files import LockContended, OwnerLock, describe, write_atomically
from soda.record import flatten
from soda.store import redact

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
# Not compared on resume: the sweeper's own settings, which a trial's config carries but which do
# not shape the run; data_root, which only dataset.root (compared) reads; and how the record
# copes with a store that goes away. Runs recorded before data_root and the tracking ones existed
# lack them.
NOT_RUN_SETTINGS = (
    "sweep.n_jobs",
    "sweep.n_trials",
    "sweep.max_failure_rate",
    "data_root",
    "tracking.timeout_s",
    "tracking.resume_without_record",
    "peer_timeout_s",
    "rendezvous_timeout_s",
)


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


class RunDirectory:
    """The run directory, claimed for this process (`claim`) until `release`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = OwnerLock(
            self.path / LOCK_FILE,
            refresh_seconds=HEARTBEAT_SECONDS,
            stale_after_seconds=STALE_AFTER_SECONDS,
            requeue_takes_over=True,  # only rank 0 claims: a lock of our SLURM job is from before a requeue
        )

    @property
    def token(self) -> str:
        """What this process's lock record holds as its token."""
        return self._lock.token

    @property
    def previous_owner(self) -> dict | None:
        """A stale owner this process took the directory over from."""
        return self._lock.previous_owner

    def claim(self) -> None:
        """Make the directory and take its lock, or stop with one line naming its owner."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            owner = self._lock.try_acquire()
        except OSError as error:
            raise _unwritable(self.path, error) from None
        except LockContended:
            raise RunDirError(
                f"run directory {self.path}: could not take its lock {self._lock.path}; try again"
            ) from None
        if owner is not None:
            raise RunDirError(
                f"run directory {self.path} is in use by {describe(owner)}; wait for that run to end, "
                f"or give this one another directory (hydra.run.dir=...)"
            )

    def release(self) -> None:
        """Give the lock up (only if it is still ours)."""
        self._lock.release()

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
