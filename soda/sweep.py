"""The trial's side of an Optuna sweep: open the study's storage, report probe accuracies as
intermediate values, and ask the study's pruner whether to stop.

The sweeper (hydra_plugins/soda_sweeper) runs in another process, often on another machine: it
asks Optuna for a trial, launches the job with `sweep.trial=<number>`, and tells Optuna the result.
Everything else the two share travels through the storage: the pruner's settings are a user
attribute of the study, the intermediate values are written by the trial itself.

Storage: a URL (`postgresql://user@host/db`, `sqlite:///file.db`) is an Optuna RDB storage;
anything else is a path to an Optuna journal file. The journal is the default because it is the
one file-based storage that works where sweeps run: many processes append to it under a lock
made with O_CREAT|O_EXCL, which holds on NFS, whereas SQLite's locks are unreliable on NFS and
turn concurrent writers into "database is locked" errors. For many concurrent trials, use
PostgreSQL. A journal is healed when opened and before each append (soda/journal.py).

A storage that stops answering (PostgreSQL stopped, the journal's file system gone) is waited for:
each call that fails for that reason is tried again for up to `timeout_s`
(`hydra.sweeper.storage_timeout_s`), then raises StorageLost, one line that names the storage and
what to do. A dead server does not hang a call: connections time out after CONNECT_TIMEOUT_S and
TCP keepalives notice a peer that vanished.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

from soda.errors import StorageLost, SweepError, first_line
from soda.patience import patiently
from soda.store import redact

log = logging.getLogger(__name__)

RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql")
PRUNER_ATTR = "soda_pruner"  # study user attribute: {"name": ..., "options": {...}}
STORAGE_TIMEOUT_ATTR = "soda_storage_timeout_s"  # study user attribute: the sweep's storage_timeout_s
STORAGE_TIMEOUT_S = 120.0  # the default of hydra.sweeper.storage_timeout_s
CONNECT_TIMEOUT_S = 10
# libpq's: a connection attempt, and a server that vanished (no reply to 3 probes 5 s apart after
# 10 s of silence), end in an error rather than a wait of the kernel's TCP timeouts (minutes).
POSTGRES_CONNECT_ARGS = {
    "connect_timeout": CONNECT_TIMEOUT_S,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def open_storage(spec: str, timeout_s: float = STORAGE_TIMEOUT_S):
    """An Optuna storage for `spec` (see the module docstring) that waits up to `timeout_s` for a
    storage that stops answering; one-line SweepError if it cannot be used now."""
    import optuna

    spec = str(spec)
    scheme = spec.split("://", 1)[0].split("+", 1)[0] if "://" in spec else ""
    if scheme:
        if scheme not in RDB_SCHEMES:
            raise SweepError(
                f"sweep.storage={redact(spec)!r}: unknown scheme {scheme!r}; use postgresql://..., sqlite:///... "
                "or a file path (an Optuna journal)"
            )
        connect_args = {"postgresql": POSTGRES_CONNECT_ARGS, "postgres": POSTGRES_CONNECT_ARGS}.get(scheme, {})
        if scheme == "mysql":
            connect_args = {"connect_timeout": CONNECT_TIMEOUT_S}
        try:
            storage = optuna.storages.RDBStorage(
                spec, engine_kwargs={"pool_pre_ping": True, "connect_args": connect_args}
            )
        except Exception as error:
            raise SweepError(
                f"Optuna storage {redact(spec)} cannot be used ({first_line(error)}); start the database "
                "(make postgres-up for the local PostgreSQL) or fix sweep.storage"
            ) from None
        return PatientStorage(storage, spec, timeout_s)
    path = Path(spec).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
    except OSError as error:
        raise SweepError(f"Optuna journal {path} cannot be written ({error.strerror}); fix sweep.storage") from None
    from soda.journal import HealingJournalBackend

    try:
        backend = HealingJournalBackend(path)
        backend.heal()
        storage = optuna.storages.JournalStorage(backend)
    except OSError as error:
        raise SweepError(f"Optuna journal {path} cannot be read ({error.strerror}); fix sweep.storage") from None
    return PatientStorage(storage, spec, timeout_s)


def unreachable(error: BaseException) -> str | None:
    """Why the storage did not answer, when that is what `error` says (a database connection that
    failed or broke, a journal file that cannot be read or written); None for any other error,
    which is the call's own."""
    import sqlalchemy.exc

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, sqlalchemy.exc.OperationalError) or (
            isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated
        ):
            return first_line(error.orig if error.orig is not None else error)
        if isinstance(error, OSError):
            where = f" ({error.filename})" if error.filename else ""
            return f"{error.strerror or first_line(error)}{where}"
        error = error.__cause__ or error.__context__
    return None


class PatientStorage:
    """An Optuna storage that waits for its database or file: a call that fails because the
    storage does not answer is tried again, for up to `timeout_s` in all, then raises StorageLost.
    Any other error is the call's own and passes through at once.

    Optuna takes it for a storage (it only calls the methods of optuna.storages.BaseStorage); it is
    a wrapper, not a subclass, so that every method, those Optuna adds included, goes through it.
    A call tried again may be one whose first try the database had committed before the
    connection broke: at worst an extra trial left RUNNING, which the next run records as
    interrupted."""

    def __init__(self, storage, spec: str, timeout_s: float):
        self.storage = storage
        self.spec = str(spec)
        self.timeout_s = float(timeout_s)

    def __getattr__(self, name: str):
        value = getattr(self.storage, name)
        if name.startswith("_") or not callable(value):
            return value
        return functools.partial(self._call, value)

    def _call(self, method, *args, **kwargs):
        spec = redact(self.spec)

        def warn(reason: str) -> None:
            log.warning(
                "Optuna storage %s does not answer (%s); trying again for up to %g s", spec, reason, self.timeout_s
            )

        def give_up(reason: str, error: Exception) -> StorageLost:
            return StorageLost(
                f"Optuna storage {spec} stopped answering ({reason}) for {self.timeout_s:g} s; "
                "start it again and re-run the same command to continue the study"
            )

        return patiently(
            functools.partial(method, *args, **kwargs),
            timeout_s=self.timeout_s,
            reason_of=unreachable,
            warn=warn,
            give_up=give_up,
            first_pause_s=0.25,
            longest_pause_s=5.0,
        )


def pruner_classes() -> dict:
    import optuna

    p = optuna.pruners
    return {
        "none": p.NopPruner,
        "median": p.MedianPruner,
        "percentile": p.PercentilePruner,
        "successive_halving": p.SuccessiveHalvingPruner,
        "hyperband": p.HyperbandPruner,
        "threshold": p.ThresholdPruner,
        "patient": p.PatientPruner,  # wraps another pruner (option `wrapped`); see make_pruner
        "wilcoxon": p.WilcoxonPruner,
    }


def make_pruner(name: str, options: dict | None = None):
    """An Optuna pruner from its short name and keyword arguments (`patient` wraps `median`)."""
    import optuna

    options = dict(options or {})
    classes = pruner_classes()
    if name not in classes:
        raise SweepError(f"pruner {name!r} is not known; allowed: {', '.join(classes)}")
    try:
        if name == "patient":
            inner = options.pop("wrapped", "median")
            return optuna.pruners.PatientPruner(make_pruner(inner), **options)
        return classes[name](**options)
    except TypeError as error:
        raise SweepError(f"pruner {name!r}: {error}") from None


class TrialReporter:
    """Reports one objective per evaluation to a running trial and says when to stop it."""

    def __init__(self, storage: str, study_name: str, number: int):
        import optuna

        self.storage = open_storage(storage)
        try:
            study_id = self.storage.get_study_id_from_name(study_name)
        except KeyError:
            raise SweepError(f"sweep.trial={number}: study {study_name!r} is not in {redact(storage)}") from None
        attrs = self.storage.get_study_user_attrs(study_id)
        # The sweep's patience with its storage is the trial's too.
        self.storage.timeout_s = float(attrs.get(STORAGE_TIMEOUT_ATTR, self.storage.timeout_s))
        pruner = make_pruner(**attrs.get(PRUNER_ATTR, {"name": "none"}))
        self.study = optuna.load_study(study_name=study_name, storage=self.storage, pruner=pruner)
        if len(self.study.directions) > 1:
            raise SweepError("a multi-objective study cannot report intermediate values (Optuna has no pruning there)")
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, number)
        self.trial = optuna.trial.Trial(self.study, trial_id)
        self.number = number

    def report(self, value: float, step: int) -> bool:
        """Record `value` at `step`; True when the pruner says the trial should stop now."""
        if not math.isfinite(value):
            return False  # a NaN objective fails the trial at its end; it is not a pruning signal
        self.trial.report(float(value), step)
        prune = self.trial.should_prune()
        if prune:
            log.info("trial %d: pruned at step %d (value %.4f)", self.number, step, value)
        return prune
