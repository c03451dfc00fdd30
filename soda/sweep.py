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
PostgreSQL.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from soda.errors import SodaError, first_line
from soda.tracking import redact

log = logging.getLogger(__name__)

RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql")
PRUNER_ATTR = "soda_pruner"  # study user attribute: {"name": ..., "options": {...}}


class SweepError(SodaError):
    """A sweep that cannot start or continue: bad sweep file, unusable storage, too many failures."""


def open_storage(spec: str):
    """An Optuna storage for `spec` (see the module docstring); one-line SweepError if unusable."""
    import optuna

    spec = str(spec)
    scheme = spec.split("://", 1)[0].split("+", 1)[0] if "://" in spec else ""
    if scheme:
        if scheme not in RDB_SCHEMES:
            raise SweepError(
                f"sweep.storage={redact(spec)!r}: unknown scheme {scheme!r}; use postgresql://..., sqlite:///... "
                "or a file path (an Optuna journal)"
            )
        try:
            return optuna.storages.RDBStorage(spec, engine_kwargs={"pool_pre_ping": True})
        except Exception as error:
            raise SweepError(
                f"Optuna storage {redact(spec)} cannot be used ({first_line(error)}); start the database "
                "(make postgres-up for the local PostgreSQL) or fix sweep.storage"
            ) from None
    path = Path(spec).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
    except OSError as error:
        raise SweepError(f"Optuna journal {path} cannot be written ({error.strerror}); fix sweep.storage") from None
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
    return optuna.storages.JournalStorage(backend)


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
