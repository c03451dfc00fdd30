"""The MLflow tracking store: where records go by default, whether a store can be used, and
`Store`, one client bound to one store's URI.

soda.tracking's Tracker writes a run's record; everything else that reads or writes MLflow (the
post-hoc evaluation of soda.saved_run, the sweep's parent run in launching/sweeper, analysis/)
goes through a Store, so that no other module opens its own client or checks a store its own way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from soda.errors import TrackingError, first_line

# Where records go by default: beside the directory the command runs in, unless the environment
# says otherwise (the package's own location never decides).
TRACKING_URI_ENV = "SODA_TRACKING_URI"
MLFLOW_URI_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own, honoured after ours
SWEEP_STORAGE_ENV = "SODA_SWEEP_STORAGE"
STORE_DIR_ENV = "SODA_STORE_DIR"


def store_dir() -> Path:
    """$SODA_STORE_DIR, else the working directory: the folder of the embedded stores."""
    return Path(os.environ.get(STORE_DIR_ENV) or os.getcwd()).resolve()


def default_tracking_uri() -> str:
    """$SODA_TRACKING_URI, else MLflow's $MLFLOW_TRACKING_URI, else the embedded SQLite store
    `mlflow.db` in store_dir(). (tracking.uri on the command line comes before all of them.)"""
    return (
        os.environ.get(TRACKING_URI_ENV) or os.environ.get(MLFLOW_URI_ENV) or f"sqlite:///{store_dir() / 'mlflow.db'}"
    )


def default_artifact_location() -> str:
    """Where a new experiment of the embedded store keeps its artifacts."""
    return str(store_dir() / "mlartifacts")


def default_sweep_storage() -> str:
    """$SODA_SWEEP_STORAGE, else the Optuna journal `optuna-journal.log` in store_dir()."""
    return os.environ.get(SWEEP_STORAGE_ENV) or str(store_dir() / "optuna-journal.log")


def redact(url: str) -> str:
    """A store URL without its password, for messages and MLflow params."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", str(url))


# ---------------------------------------------------------------------------------------------
# MLflow's SQL store logs every database error with its traceback before raising it; we raise it
# again as one line that says what to do, so its copy is noise on the user's terminal.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


@contextlib.contextmanager
def quick_http_failures(timeout: float = 10):
    """MLflow retries an unreachable server for minutes by default (its own budget, which
    tracking.timeout_s replaces); a check should fail now, and a run's write retries on its own
    terms (Tracker._write). `timeout`: seconds one request may take."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, int(timeout)))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def server_unreachable(uri: str) -> str | None:
    """Why the http(s) server of `uri` does not accept a connection; None when it does."""
    parsed = urlparse(uri)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as error:
        return str(error.strerror or error)
    return None


def _server_answers(uri: str, otherwise: str) -> None:
    """A TrackingError, ending with what to do (`otherwise`: the caller's other way out), unless
    the tracking server at `uri` answers."""
    reason = server_unreachable(uri)
    if reason:
        raise TrackingError(
            f"MLflow tracking server {redact(uri)} is unreachable ({reason}); start it (make mlflow-server), {otherwise}"
        )


def check_reachable(uri: str) -> None:
    """Fail now, with what to do, if the tracking store cannot be written."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        _server_answers(uri, "fix tracking.uri, or use tracking=local")
    elif parsed.scheme == "sqlite":
        database = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        if database is not None:
            try:
                database.parent.mkdir(parents=True, exist_ok=True)
            except OSError:
                pass
            if not os.access(database if database.exists() else database.parent, os.W_OK):
                raise TrackingError(
                    f"MLflow store {uri} is not writable (check the folder's permissions), or set tracking.uri"
                )
    import mlflow

    try:
        with quick_http_failures(), _one_creator(uri):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as error:
        reason = first_line(error)
        raise TrackingError(
            f"MLflow tracking store {uri} cannot be used ({reason}); fix tracking.uri or use tracking=local"
        ) from None


@contextlib.contextmanager
def _one_creator(uri: str):
    """MLflow creates an SQLite store's tables on first use; two processes doing so at once fail
    ("Online migration expected to match one row"). Take turns on a lock file beside the store."""
    database = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") and "?" not in uri else None
    if database is None:
        yield
        return
    import fcntl

    try:
        handle = open(database.with_name(f"{database.name}.lock"), "a")  # held below
    except OSError:
        yield  # a read-only folder: nobody can create the store there anyway
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def get_or_create_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created if missing (safe when several processes race)."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


def unanswered(error: BaseException) -> bool:
    """Is `error` the store not answering (a refused or timed-out connection, a server error, a
    database that cannot be reached or is locked), which a later try may not meet, rather than a
    request the store refused (a bad value), which every try would meet?"""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        if isinstance(error, (ConnectionError, TimeoutError)) or type(error).__name__ == "OperationalError":
            return True
        if type(error).__module__.startswith(("requests", "urllib3")):
            return True
        # MLflow's REST client: "API request to <url> failed with exception ..." (no answer, or
        # retries spent on 429/5xx) or "... failed with error code 503 != 200" (an answer that is
        # not JSON: a proxy or a server that is going down).
        if text.startswith("API request to") and not re.search(r"error code 4\d\d", text):
            return True
        if "OperationalError" in text:  # SQLAlchemy's text, kept by MLflow's SQL store
            return True
        error = error.__cause__ or error.__context__
    return False


class Store:
    """One MLflow tracking store, through one client bound to its URI (never MLflow's
    process-wide URI): the operations that the post-hoc evaluation, the sweep's parent run and
    analysis/ need. Reads may also use `client` directly."""

    def __init__(self, uri: str):
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(uri)

    @classmethod
    def checked(cls, uri: str) -> Store:
        """The store at `uri`, checked usable first (check_reachable: one line if it is not)."""
        check_reachable(uri)
        return cls(uri)

    def check(self) -> None:
        """Fail now, with what to do, if the store cannot be written (check_reachable)."""
        check_reachable(self.uri)

    @classmethod
    def for_reading(cls, uri: str, option: str = "--tracking-uri") -> Store:
        """The store at `uri`, checked readable without creating anything there (MLflow would
        create an empty database at a wrong path and report "no runs"); a TrackingError whose
        one line ends with what to do (`option`: the flag that names another store)."""
        shown = redact(uri)
        parsed = urlparse(uri)
        if parsed.scheme == "sqlite":
            path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
            if not path or not Path(path).is_file():
                raise TrackingError(
                    f"no MLflow store at {shown}: {path or 'that URI'} is not a file "
                    f"(train a run first, e.g. `make demo`, or pass another {option})"
                )
        elif parsed.scheme in ("", "file"):
            folder = Path(parsed.path if parsed.scheme == "file" else uri)
            if not folder.is_dir():
                raise TrackingError(f"no MLflow store at {shown}: {folder} is not a folder (pass another {option})")
        elif parsed.scheme in ("http", "https"):
            _server_answers(uri, f"or pass another {option}")
        store = cls(uri)
        try:
            with quick_http_failures():
                store.client.search_experiments(max_results=1)
        except Exception as error:
            raise TrackingError(f"MLflow tracking store {shown} cannot be read ({first_line(error)})") from None
        return store

    # Reads.
    def experiment_id(self, name: str, artifact_location: str | None = None) -> str:
        """The id of experiment `name`, created if missing."""
        return get_or_create_experiment(self.client, name, artifact_location)

    def get_run(self, run_id: str):
        return self.client.get_run(run_id)

    def find_run(self, run_id: str | None):
        """The run `run_id`, or None when there is none (no id, or a deleted run)."""
        if not run_id:
            return None
        try:
            return self.client.get_run(run_id)
        except Exception:
            return None

    def search_runs(self, experiment_ids: list[str], filter_string: str, **options) -> list:
        return self.client.search_runs(experiment_ids, filter_string=filter_string, **options)

    def steps_of(self, run_id: str, key: str) -> list[int]:
        """The steps at which run `run_id` has a point of metric `key`."""
        return [point.step for point in self.client.get_metric_history(run_id, key)]

    # Writes, each on its own: a write retried by a caller never repeats one the store took.
    def create_run(
        self,
        experiment_id: str,
        name: str,
        tags: dict[str, str],
        params: dict[str, str] | None = None,
        texts: dict[str, str] | None = None,
    ) -> str:
        """A new run with `tags`, then its `params` and `texts` (artifact file -> text); its id."""
        run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        for key, value in (params or {}).items():
            self.client.log_param(run_id, key, value)
        for artifact, text in (texts or {}).items():
            self.client.log_text(run_id, text, artifact)
        return run_id

    def reopen(self, run_id: str) -> None:
        """Mark an ended run RUNNING again (a resumed sweep)."""
        self.client.update_run(run_id, status="RUNNING")

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def delete_tag(self, run_id: str, key: str) -> None:
        """Remove tag `key` from the run, where it has one."""
        if key in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, key)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.client.log_metric(run_id, key, value, step=step)

    def log_batch(self, run_id: str, metrics: dict[str, float], step: int, tags: dict[str, str]) -> None:
        """`metrics` at `step` and `tags` in one write (all or nothing), timed now."""
        import time

        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        points = [Metric(key, value, now, step) for key, value in metrics.items()]
        self.client.log_batch(run_id, metrics=points, tags=[RunTag(key, value) for key, value in tags.items()])

    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)
