"""MLflow tracking for one run: checked reachable before any work, resumable after a restart.

A restarted run (same run directory) continues the same MLflow run: its id is kept in
`<run_dir>/mlflow_run_id`, and metrics already recorded at a step are not recorded again, so a
replayed epoch leaves no duplicate points.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from soda.errors import TrackingError, TrackingLost, first_line
from soda.faults import mark
from soda.files import write_atomically
from soda.patience import patiently
from soda.record import (
    ENDED,
    ENDINGS,
    ERROR,
    LOST,
    LOST_RECORD,
    POINTS_LOGGED,
    PREVIOUS_END,
    RECORD_STARTS_AT,
    RESUME_CHANGES,
    RESUMED,
)
from soda.store import check_reachable, get_or_create_experiment, quick_http_failures, redact, unanswered

log = logging.getLogger(__name__)
RUN_ID_FILE = "mlflow_run_id"
# How the last process ended, written into the run directory when it could not say so in the
# store (the store had stopped answering); the next start records it as PREVIOUS_END.
END_FILE = "unrecorded-end.json"


class Tracker:
    def __init__(
        self,
        uri: str,
        experiment: str,
        artifact_location: str | None = None,
        run_name: str | None = None,
        system_metrics: bool = True,
        tags: dict[str, str] | None = None,
        timeout_s: float = 120.0,
        resume_without_record: bool = False,
    ):
        self.uri = uri
        self.experiment = experiment
        self.artifact_location = artifact_location
        self.run_name = run_name
        self.system_metrics = system_metrics
        self.tags = dict(tags or {})
        self.timeout_s = timeout_s
        self.resume_without_record = resume_without_record
        self.run_id: str | None = None
        self.resumed = False
        self.lost: TrackingLost | None = None  # set once the store stopped answering for timeout_s
        self.lost_reason = ""
        self.lost_record: str | None = None  # the run directory's MLflow run, when the store lacks it
        self._recorded_steps: dict[str, int] = {}  # key -> last step already in the store
        self.points_logged = 0  # metric points this process sent (a check against what the store holds)
        self._client = None
        self._live = False  # started and not yet ended by this process
        self._monitor = None  # MLflow's system-metrics monitor, while the run is live

    @property
    def client(self):
        """The one MlflowClient of this run, bound to its store (`uri`)."""
        if self._client is None:
            import mlflow

            self._client = mlflow.MlflowClient(self.uri)
        return self._client

    def check(self) -> None:
        """Fail before any work if the store cannot be read, or (creating the experiment when it
        is new) written."""
        check_reachable(self.uri)

        try:
            get_or_create_experiment(self.client, self.experiment, self.artifact_location)
        except Exception as error:
            raise self._unwritable(error) from None

    def _unwritable(self, error: Exception) -> TrackingError:
        lines = str(error).splitlines() or [type(error).__name__]
        # SQLAlchemy's text puts the driver's error, e.g. "(sqlite3.OperationalError) ...", on one line.
        reason = next((line.strip() for line in lines if "Error)" in line), lines[0])[:200]
        text = str(error)
        if "readonly" in text or "read-only" in text:
            reason = f"the store is read-only: {reason}"
        return TrackingError(
            f"MLflow tracking store {self.uri} cannot be written ({reason}); point tracking.uri at a "
            f"writable store, or fix its permissions"
        )

    def start(
        self, run_dir: Path, params: dict[str, str], config_yaml: str, tags: dict[str, str], epoch: int = 0
    ) -> str:
        """Start the run, or continue the one this run directory already has (`epoch`: the epoch
        this process starts at, from the run directory's checkpoint)."""
        try:
            return self._start(run_dir, params, config_yaml, tags, epoch)
        except TrackingError:
            raise
        except Exception as error:
            if self._live:  # created, then a write failed: not left RUNNING
                with contextlib.suppress(Exception):
                    self._end("FAILED")
            self.run_id = None
            raise self._unwritable(error) from None

    def _start(self, run_dir: Path, params: dict[str, str], config_yaml: str, tags: dict[str, str], epoch: int) -> str:
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        from soda.mlflow_adapter import context_tags, watch_system

        client = self.client
        experiment_id = get_or_create_experiment(client, self.experiment, self.artifact_location)
        run_dir = Path(run_dir)
        previous = self._previous_run(experiment_id, run_dir)
        unrecorded_end = _take_end_file(run_dir)
        if previous is not None:
            ended = self._previous_end(client.get_run(previous), unrecorded_end)
            client.update_run(previous, status="RUNNING")
            self.run_id, self._live, self.resumed = previous, True, True
            self._recorded_steps = self._last_steps(previous)
            # The run is live again: how the earlier process ended moves to PREVIOUS_END.
            _set_tags(client, previous, {RESUMED: "true", PREVIOUS_END: ended[:5000]})
            _delete_tag(client, previous, ERROR)
            log.info("continuing MLflow run %s (its previous process: %s)", previous, ended)
        else:
            # The run directory is a tag from the run's creation on, so a process killed before it
            # wrote mlflow_run_id still finds its run on restart instead of leaving it orphaned.
            first_tags = {"run_dir": str(run_dir.resolve()), **self._lost_record_tags(unrecorded_end, epoch)}
            if self.run_name:
                first_tags[MLFLOW_RUN_NAME] = self.run_name
            run = client.create_run(experiment_id, run_name=self.run_name, tags=context_tags(first_tags))
            self.run_id, self._live = run.info.run_id, True
            write_atomically(run_dir / RUN_ID_FILE, lambda handle: handle.write(f"{run.info.run_id}\n".encode()))
        if self.system_metrics:
            self._monitor = watch_system(self.run_id, self.uri, resumed=previous is not None)
        # Written on a resumed run too when the first process died before writing them.
        recorded = client.get_run(self.run_id)
        missing = {k: v for k, v in params.items() if k not in recorded.data.params}
        if missing:
            client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in missing.items()])
        if not any(a.path == "config.yaml" for a in client.list_artifacts(self.run_id)):
            client.log_text(self.run_id, config_yaml, "config.yaml")
        _set_tags(client, self.run_id, {**tags, **self.tags})
        return self.run_id

    def _previous_run(self, experiment_id: str, run_dir: Path) -> str | None:
        """The MLflow run this run directory already has: the id in its mlflow_run_id file, or
        else (killed between creating the run and writing the file) the newest run tagged with
        this directory."""
        id_file = run_dir / RUN_ID_FILE
        previous = id_file.read_text().strip() if id_file.exists() else ""
        if previous and self._run_exists(previous):
            return previous
        where = str(run_dir.resolve())
        found = []
        if "'" not in where:
            found = self.client.search_runs(
                experiment_ids=[experiment_id],
                filter_string=f"tags.run_dir = '{where}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
        if found:
            return found[0].info.run_id
        if previous:
            # The run directory has a record that this store lacks: a new run would look like a
            # whole one while holding only the later epochs.
            if not self.resume_without_record:
                raise TrackingError(
                    f"run directory {run_dir} is recorded as MLflow run {previous}, which {redact(self.uri)} "
                    f"(experiment {self.experiment}) does not hold (store deleted or replaced?); point tracking.uri "
                    "at the store that holds it, or re-run with tracking.resume_without_record=true to continue "
                    "in a new MLflow run tagged as such"
                )
            self.lost_record = previous
        return None

    def _lost_record_tags(self, unrecorded_end: str | None, epoch: int) -> dict[str, str]:
        """A new run continuing a run directory whose record is gone says so."""
        if self.lost_record is None:
            return {}
        log.warning(
            "MLflow run %s of this run directory is not in %s: continuing in a new run from epoch %d "
            "(tracking.resume_without_record=true); the earlier epochs are not in it",
            self.lost_record,
            redact(self.uri),
            epoch,
        )
        self.resumed = True
        return {
            RESUMED: "true",
            LOST_RECORD: f"{self.lost_record} (not in {redact(self.uri)})",
            RECORD_STARTS_AT: str(epoch),
            PREVIOUS_END: (unrecorded_end or f"unknown: its record, MLflow run {self.lost_record}, is gone")[:5000],
        }

    @staticmethod
    def _previous_end(run, unrecorded_end: str | None = None) -> str:
        """How the process before this one ended, from its run's record (or, when the store was
        gone as it ended, from the run directory: `unrecorded_end`)."""
        if run.info.status == "RUNNING":
            # Nobody recorded an end: the store was gone, or killed without a chance to.
            return unrecorded_end or LOST
        tags = run.data.tags
        how = tags.get(ENDED, run.info.status.lower())
        return f"{how}: {tags[ERROR]}" if tags.get(ERROR) else how

    def record_resume_changes(self, changes: dict[str, tuple[str, str]]) -> None:
        """Settings that changed on resume (soda.rundir.RESUMABLE_CHANGES), added to the run's
        RESUME_CHANGES tag; the params keep the values the run started with."""
        if not changes or self.run_id is None:
            return
        client = self.client
        earlier = self._write(client.get_run, self.run_id).data.tags.get(RESUME_CHANGES, "")
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        added = f"{now} " + ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changes.items())
        self._write(client.set_tag, self.run_id, RESUME_CHANGES, "\n".join(filter(None, [earlier, added]))[-5000:])
        log.info("resumed with changed settings: %s", added)

    def _run_exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:
            return False

    def _last_steps(self, run_id: str) -> dict[str, int]:
        client = self.client
        keys = client.get_run(run_id).data.metrics.keys()
        return {
            key: max(m.step for m in client.get_metric_history(run_id, key))
            for key in keys
            if not key.startswith("system/")
        }

    # ----------------------------------------------------------------------------------------
    # Writes while the run is live. A store that stops answering is retried for timeout_s (not
    # MLflow's own budget of minutes per request); then the write raises TrackingLost, and the
    # run ends without waiting on the store again (abandon).

    def _write(self, write, *args, **kwargs):
        if self.lost is not None:
            raise self.lost
        store = redact(self.uri)

        def attempt():
            with quick_http_failures(timeout=min(30.0, self.timeout_s)):
                return write(*args, **kwargs)

        def warn(reason: str) -> None:
            log.warning(
                "MLflow tracking store %s does not answer (%s); retrying for up to %s s (tracking.timeout_s)",
                store,
                reason,
                f"{self.timeout_s:g}",
            )

        def give_up(reason: str, error: Exception) -> TrackingLost:
            self.lost_reason = (
                f"MLflow tracking store {store} stopped answering for {self.timeout_s:g} s "
                f"(tracking.timeout_s; last: {first_line(error, limit=120)})"
            )
            self.lost = TrackingLost(
                f"{self.lost_reason}; the last checkpoint is kept: bring the store back and re-run "
                f"the same command to continue MLflow run {self.run_id} from it"
            )
            return self.lost

        return patiently(
            attempt,
            timeout_s=self.timeout_s,
            reason_of=lambda error: first_line(error) if unanswered(error) else None,
            warn=warn,
            give_up=give_up,
            answered_again=lambda: log.warning("MLflow tracking store %s answers again", store),
        )

    def abandon(self, run_dir: Path, where: str) -> None:
        """The store is gone: leave the run without contacting it again, and say in the run
        directory how this process ended (END_FILE, `where`: e.g. `in epoch 3`), for the record
        of the next start."""
        write_end_file(run_dir, self.run_id, f"tracking_lost: {self.lost_reason} {where}")
        # One quick try to say it in the store as well (it may be back); the run is over for this
        # process even when the store does not answer, so nothing waits on it again.
        with quick_http_failures(timeout=2), contextlib.suppress(Exception):
            client = self.client
            client.set_tag(self.run_id, ERROR, f"{self.lost_reason} {where}"[:5000])
            client.set_tag(self.run_id, ENDED, "tracking_lost")
        with quick_http_failures(timeout=2), contextlib.suppress(Exception):
            self._end(ENDINGS["tracking_lost"])
        self._live = False

    def fail_from_another_thread(self, error: str) -> None:
        """End the run FAILED from a thread other than the one training (soda.heartbeat's watch,
        before the process leaves): written through the client, leaving the run's own end alone."""

        if self.run_id is None:
            return
        client = self.client
        self._write(client.set_tag, self.run_id, ERROR, error[:5000])
        self._write(client.set_tag, self.run_id, ENDED, "failed")
        self._write(client.set_terminated, self.run_id, ENDINGS["failed"])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        fresh = {k: float(v) for k, v in metrics.items() if step > self._recorded_steps.get(k, -1)}
        if fresh:
            mark("mlflow.log_metrics")
            now = int(time.time() * 1000)
            points = [Metric(key, value, now, step) for key, value in fresh.items()]
            self._write(self.client.log_batch, self.run_id, metrics=points)
            self.points_logged += len(fresh)

    def log_artifact(self, path: Path, folder: str) -> None:
        self._write(self.client.log_artifact, self.run_id, str(path), folder)

    def finish(self, ended: str, error: str | None = None, tags: dict[str, str] | None = None) -> None:
        """End the run as `ended` (a key of ENDINGS) says, with its MLflow status and tags."""
        if not self._live:
            return
        run_id, client, status = self.run_id, self.client, ENDINGS[ended]
        # Each write on its own (a retried write must not repeat one the store already took).
        if error and status != "FINISHED":
            self._write(client.set_tag, run_id, ERROR, error[:5000])
        elif status == "FINISHED":
            self._write(_delete_tag, client, run_id, ERROR)  # a finished run claims no error
        # Points sent by this process (a resumed run's earlier points were sent by earlier ones).
        for key, value in {**(tags or {}), ENDED: ended, POINTS_LOGGED: str(self.points_logged)}.items():
            self._write(client.set_tag, run_id, key, value)
        self._write(self._end, status)

    def _end(self, status: str) -> None:
        """The run's end in the store, then its system metrics' monitor's (whose last flush goes
        to the store as well); the monitor stops even when the store does not answer."""
        try:
            self.client.set_terminated(self.run_id, status)
            self._live = False
        finally:
            monitor, self._monitor = self._monitor, None
            if monitor is not None:
                with quick_http_failures(timeout=5), contextlib.suppress(Exception):
                    monitor.finish()


def write_end_file(run_dir: Path, run_id: str | None, ended: str) -> None:
    """Say in the run directory how this process ended (END_FILE), where the store cannot."""
    record = json.dumps({"run_id": run_id, "ended": ended}).encode()
    write_atomically(Path(run_dir) / END_FILE, lambda handle: handle.write(record))


def _take_end_file(run_dir: Path) -> str | None:
    """How the last process in `run_dir` ended when it could not tell the store (END_FILE),
    removed once read: the record it belongs to is being continued now."""
    path = Path(run_dir) / END_FILE
    try:
        ended = json.loads(path.read_text())["ended"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path.unlink(missing_ok=True)
    return str(ended)


def _set_tags(client, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def _delete_tag(client, run_id: str, key: str) -> None:
    if key in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, key)


class NullTracker:
    """The tracker of every rank but global rank 0 (and of code run without a record): it has
    the Tracker's methods and records nothing, so callers need no "am I rank 0" branches."""

    run_id = None
    resumed = False
    points_logged = 0

    def check(self) -> None:
        pass

    def start(
        self, run_dir: Path, params: dict[str, str], config_yaml: str, tags: dict[str, str], epoch: int = 0
    ) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, folder: str) -> None:
        pass

    def record_resume_changes(self, changes: dict[str, tuple[str, str]]) -> None:
        pass

    def finish(self, ended: str, error: str | None = None, tags: dict[str, str] | None = None) -> None:
        pass

    def abandon(self, run_dir: Path, where: str) -> None:
        pass

    def fail_from_another_thread(self, error: str) -> None:
        pass
