"""Faults in the middle of a sweep, without jobs (seconds): a journal torn by a writer that died
mid-write, an Optuna storage that stops answering, a study resumed with other sweep settings.
The same faults with real processes and a real PostgreSQL are in tests/system/test_outages.py."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import sqlalchemy.exc
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from launching.sweeper.parent_run import ParentRun
from launching.sweeper.sampler import SamplerSpec
from launching.sweeper.scheduler import Scheduler
from launching.sweeper.search_space import grid_cells, parse_space
from launching.sweeper.study import SETTINGS_ATTR, check_sweep_settings, sweep_settings
from launching.sweeper.trials import ERROR_ATTR, STORAGE_LOST, SweepState, recover
from soda.journal import TORN_SUFFIX
from soda.record import ERROR, LINEAR_ACC, PREVIOUS_END, RESUME_CHANGES
from soda.sweep import PatientStorage, StorageLost, SweepError, open_storage
from tests.test_sweep_scheduler import FakeParent, _returned

optuna.logging.set_verbosity(optuna.logging.WARNING)
X = {"x": optuna.distributions.FloatDistribution(0, 1)}


def _journal(folder: Path) -> Path:
    """A real journal: a study of three finished trials, as a sweep leaves one."""
    path = folder / "optuna.log"
    study = optuna.create_study(study_name="s", storage=open_storage(str(path)))
    for _ in range(3):
        trial = study.ask(X)
        study.tell(trial, trial.params["x"])
    return path


def _assert_whole(path: Path) -> None:
    """Every line a JSON record, the last one ended: what any later writer can append to."""
    data = path.read_bytes()
    assert data.endswith(b"\n")
    for number, line in enumerate(data.split(b"\n")[:-1], start=1):
        assert isinstance(json.loads(line), dict), f"line {number}: {line[:80]!r}"


def _optuna_reads(path: Path, name: str) -> optuna.Study:
    """The study as Optuna's own reader sees it (not ours): the format is still Optuna's."""
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(JournalFileBackend(str(path))))


# ---------------------------------------------------------------------------------------------
# Journals that heal


def test_a_journal_torn_at_any_byte_of_its_last_record_heals_before_the_next_write(tmp_path, caplog):
    data = _journal(tmp_path / "original").read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1  # where the last record (the third trial's end) starts
    caplog.set_level(logging.WARNING, logger="soda.journal")
    for cut in range(last + 1, len(data)):  # every torn length, the one missing only its newline too
        path = tmp_path / str(cut) / "optuna.log"
        path.parent.mkdir()
        path.write_bytes(data[:cut])
        storage = open_storage(str(path))
        study = optuna.load_study(study_name="s", storage=storage)
        assert len(study.trials) == 3 and study.trials[2].state.name == "RUNNING"  # as before the torn write
        study.tell(study.ask(X), 0.5)  # the same study, appended to
        new = optuna.create_study(study_name="new", storage=storage)  # a new one
        new.tell(new.ask(), 1.0)
        _assert_whole(path)
        states = [t.state.name for t in _optuna_reads(path, "s").trials]
        assert states == ["COMPLETE", "COMPLETE", "RUNNING", "COMPLETE"], f"cut at {cut}: {states}"
        assert [t.value for t in _optuna_reads(path, "new").trials] == [1.0]
        (side,) = path.parent.glob(f"optuna.log{TORN_SUFFIX}*")
        assert side.read_bytes() == data[last:cut]  # what was cut is kept
    warnings = [r.getMessage() for r in caplog.records if "cut" in r.getMessage()]
    assert len(warnings) == len(data) - last - 1
    assert "bytes of a record whose writer stopped mid-write" in warnings[0]


def test_a_record_appended_to_a_torn_one_by_an_older_writer_is_cut(tmp_path):
    # What the sweeper did before it healed journals: its next record landed on the torn bytes,
    # a line Optuna skips while it is the last and cannot read past once another follows.
    path = _journal(tmp_path)
    data = path.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    poisoned = data[: last + 20] + data[last:]
    path.write_bytes(poisoned)
    study = optuna.load_study(study_name="s", storage=open_storage(str(path)))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "RUNNING"]
    new = optuna.create_study(study_name="new", storage=study._storage)  # was "Should not reach"
    new.tell(new.ask(), 1.0)
    _assert_whole(path)
    assert len(_optuna_reads(path, "new").trials) == 1


def test_a_writer_that_dies_while_the_sweep_has_the_journal_open_tears_nothing(tmp_path):
    # A trial SIGKILLed in the middle of reporting, while the sweeper's storage is open.
    path = _journal(tmp_path)
    study = optuna.load_study(study_name="s", storage=open_storage(str(path)))
    trial = study.ask(X)
    with open(path, "ab") as handle:
        handle.write(b'{"op_code":7,"worker_id":"w","trial_id":3,"step":1,"inter')
    study.tell(trial, 0.25)
    _assert_whole(path)
    assert _optuna_reads(path, "s").trials[3].value == 0.25


def test_a_torn_tail_is_cut_only_under_the_journal_lock(tmp_path):
    # Without the lock, a last line without its newline may be a write in progress.
    path = _journal(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    lock = JournalFileOpenLock(str(path))  # as another writer holds it
    lock.acquire()
    opened = threading.Thread(target=open_storage, args=(str(path),))
    opened.start()
    time.sleep(0.5)
    assert path.read_bytes() == data[:-5]  # waiting for the lock
    lock.release()
    opened.join(timeout=10)
    assert not opened.is_alive()
    _assert_whole(path)


def test_a_journal_damaged_before_its_last_line_is_refused_in_one_line(tmp_path):
    path = _journal(tmp_path)
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2][:10]
    path.write_bytes(b"\n".join(lines))
    total = len(lines) - 1
    with pytest.raises(SweepError) as refused:
        open_storage(str(path))
    message = str(refused.value)
    assert "\n" not in message
    assert message == (
        f"Optuna journal {path}: line 3 is not a whole record and {total - 3} more line(s) follow it, which "
        f"Optuna cannot read past; keep a copy, cut the file before that line (head -n 2 {path} > {path}.fixed "
        f"&& mv {path}.fixed {path}) and re-run: the records from line 3 on are lost"
    )


# ---------------------------------------------------------------------------------------------
# A storage that stops answering


def _break(path: Path) -> Path:
    """The journal's file gone and a folder in its place: every read and write fails, even as root."""
    kept = path.with_suffix(".kept")
    path.rename(kept)
    path.mkdir()
    return kept


def _mend(path: Path, kept: Path) -> None:
    path.rmdir()
    kept.rename(path)


def test_a_storage_that_stops_answering_is_waited_for_then_lost_in_one_line(tmp_path, caplog):
    path = _journal(tmp_path)
    study = optuna.load_study(study_name="s", storage=open_storage(str(path), timeout_s=0.6))
    trial = study.ask(X)

    # Back within the time: the call goes through.
    kept = _break(path)
    threading.Timer(0.2, _mend, args=(path, kept)).start()
    study.tell(trial, 0.5)
    assert "does not answer" in caplog.text and "trying again for up to 0.6 s" in caplog.text

    # Not back: one line that names the storage and what to do, after the stated time.
    _break(path)
    started = time.monotonic()
    with pytest.raises(StorageLost) as lost:
        study.ask(X)
    assert 0.6 <= time.monotonic() - started < 3
    assert str(lost.value) == (
        f"Optuna storage {path} stopped answering (Is a directory ({path})) for 0.6 s; "
        "start it again and re-run the same command to continue the study"
    )


def test_a_lost_database_is_named_without_its_password_and_other_errors_pass_at_once():
    class Database:
        calls = 0

        def get_all_studies(self):
            self.calls += 1
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

        def get_study_id_from_name(self, name):
            self.calls += 1
            raise KeyError(name)

    database = Database()
    storage = PatientStorage(database, "postgresql://sweeper:secret@db.example:5432/optuna", timeout_s=0.3)
    with pytest.raises(StorageLost, match=r"^Optuna storage postgresql://sweeper:\*\*\*@db.example:5432/optuna "):
        storage.get_all_studies()
    assert database.calls > 1  # tried again
    database.calls = 0
    with pytest.raises(KeyError):  # the call's own error: not the storage's absence
        storage.get_study_id_from_name("nope")
    assert database.calls == 1


def test_a_storage_lost_mid_sweep_stops_it_and_each_record_says_why(tmp_path):
    path = _journal(tmp_path)
    storage = open_storage(str(path), timeout_s=0.3)
    study = optuna.create_study(study_name="sweep", storage=storage)
    dimensions, fixed = parse_space({"a": "range(0, 3)"}, [])
    kept = []

    def launch(overrides, number):
        if number == 1:  # the storage goes while trial 1 runs
            kept.append(_break(path))
        return _returned(0.5)

    parent = FakeParent()
    state = SweepState(target=3, done=0, allowed_failures=3)
    scheduler = Scheduler(study, parent, launch, dimensions, fixed, str(path), n_jobs=1)
    with pytest.raises(StorageLost):
        scheduler.run(grid_cells(dimensions), grid=True, state=state)
    assert parent.closed == [(1, "KILLED")] and parent.errors == {1: STORAGE_LOST}  # its run: why it stopped
    assert parent.finished is None  # the sweeper ends the parent run (ParentRun.fail)

    # The storage back, the same command again: trial 1 failed, saying what stopped it.
    _mend(path, kept[0])
    study = optuna.load_study(study_name="sweep", storage=open_storage(str(path)))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]
    recover(study, study._storage, FakeParent(trial_errors={1: STORAGE_LOST}))
    assert study.trials[1].state.name == "FAIL" and study.trials[1].user_attrs[ERROR_ATTR] == STORAGE_LOST


def test_the_parent_run_of_a_lost_sweep_ends_failed_and_its_resume_says_why(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study = optuna.create_study(study_name="s")
    parent = ParentRun.open(uri, "sweeps", None, study, {}, {}, objectives=[LINEAR_ACC])
    parent.fail("Optuna storage /x/optuna.log stopped answering (...) for 120 s; start it again ...")
    client = mlflow.MlflowClient(uri)
    run = client.get_run(parent.run_id)
    assert run.info.status == "FAILED" and run.data.tags[ERROR].startswith("Optuna storage /x/optuna.log")

    again = ParentRun.open(uri, "sweeps", None, study, {}, {}, objectives=[LINEAR_ACC])
    run = client.get_run(again.run_id)
    assert again.run_id == parent.run_id and run.info.status == "RUNNING"
    assert ERROR not in run.data.tags  # live again: the error is its previous end now
    assert run.data.tags[PREVIOUS_END].startswith("failed: Optuna storage /x/optuna.log stopped answering")


# ---------------------------------------------------------------------------------------------
# No silent new history: a study resumed with other sweep settings


def _settings(seed=1, sampler="optuna.samplers.TPESampler", n_jobs=2, n_trials=8, pruner="none"):
    spec = SamplerSpec("tpe", sampler, {"seed": seed, "n_startup_trials": 4})
    return sweep_settings(spec, {"name": pruner, "options": {}}, n_jobs, n_trials, 0.25)


def test_other_sweep_settings_are_refused_in_one_line_unless_asked_and_each_change_is_recorded(tmp_path):
    study = optuna.create_study(study_name="search")
    assert check_sweep_settings(study, _settings(), resume_with_changes=False) == {}  # nothing recorded yet
    study.set_user_attr(SETTINGS_ATTR, _settings())

    # More trials, another failure rate: the same study, the change recorded.
    assert check_sweep_settings(study, _settings(n_trials=20), False) == {"sweep.n_trials": ("8", "20")}
    # What decides which trials run: refused, naming each difference the command line way.
    with pytest.raises(SweepError) as refused:
        check_sweep_settings(study, _settings(seed=2, n_jobs=4, pruner="median"), False)
    assert str(refused.value) == (
        "study search was run with other sweep settings: hydra.sweeper.sampler.seed=2 (the study's: 1), "
        "hydra.sweeper.pruner.name=median (the study's: none), sweep.n_jobs=4 (the study's: 2); they change "
        "which trials it runs: resume it with the study's settings, add hydra.sweeper.resume_with_changes=true "
        "to continue it with these (its MLflow run records the change), or give another sweep.study_name"
    )
    with pytest.raises(SweepError, match=r"hydra/sweeper/sampler=optuna.samplers.RandomSampler \(the study's: "):
        check_sweep_settings(study, _settings(sampler="optuna.samplers.RandomSampler"), False)
    # Trials in flight only decide the sequence of a seeded sampler.
    study.set_user_attr(SETTINGS_ATTR, _settings(seed=None))
    assert check_sweep_settings(study, _settings(seed=None, n_jobs=4), False) == {"sweep.n_jobs": ("2", "4")}

    # Asked for: allowed, and the sweep's run keeps each resume's changes with their time.
    study.set_user_attr(SETTINGS_ATTR, _settings())
    changes = check_sweep_settings(study, _settings(seed=2, n_trials=12), resume_with_changes=True)
    assert changes == {"hydra.sweeper.sampler.seed": ("1", "2"), "sweep.n_trials": ("8", "12")}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = ParentRun.open(uri, "sweeps", None, study, {"sweep.sampler_seed": "1"}, {}, objectives=[])
    parent.record_changes(changes)
    parent.record_changes({"sweep.n_jobs": ("2", "1")})
    tag = mlflow.MlflowClient(uri).get_run(parent.run_id).data.tags[RESUME_CHANGES]
    first, second = tag.splitlines()
    assert first.endswith(" hydra.sweeper.sampler.seed: 1 -> 2, sweep.n_trials: 8 -> 12")
    assert second.endswith(" sweep.n_jobs: 2 -> 1") and second[:4].isdigit()
