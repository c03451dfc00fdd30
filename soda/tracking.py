"""MLflow tracking for one run: checked reachable before any work, resumable after a restart.

A restarted run (same run directory) continues the same MLflow run: its id is kept in
`<run_dir>/mlflow_run_id`, and metrics already recorded at a step are not recorded again, so a
replayed epoch leaves no duplicate points.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from soda.errors import TrackingError, TrackingLost, first_line
from soda.faults import mark
from soda.files import write_atomically

log = logging.getLogger(__name__)
RUN_ID_FILE = "mlflow_run_id"
# How the last process ended, written into the run directory when it could not say so in the
# store (the store had stopped answering); the next start records it as PREVIOUS_END.
END_FILE = "unrecorded-end.json"

# ---------------------------------------------------------------------------------------------
# The record's contract. Runs write these keys and tags; analysis/, the sweeper, the benchmarks
# and the tests read them. Each is spelled here and nowhere else.

# Metrics of an evaluation (step = epoch; epoch 0 is the untrained encoder).
KNN_ACC = "eval/knn_acc"
LINEAR_ACC = "eval/linear_acc"
RECON_MSE = "eval/recon_mse"
LATENT_GAP = "eval/latent_gap"
EVAL_SECONDS = "eval/seconds"
# Factor probes, where the data set knows its factors of variation (`shapes`): eval/factor/<name>,
# accuracy for a discrete factor, R^2 for a continuous one (soda.eval.factor_probes).
FACTOR_PREFIX = "eval/factor/"
# What a sweep may optimise (`objective`).
OBJECTIVES = (KNN_ACC, LINEAR_ACC, RECON_MSE, LATENT_GAP)
# Metrics of training: per log point (step = optimiser step) ...
TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
FIRST_STEP_SECONDS = "train/first_step_seconds"
# Diagnostics, at log points only (soda.loop.Trainer): does the encoder get gradient, does the
# latent vary between images, does the decoder's modulation depend on it?
ENCODER_GRAD_NORM = "train/encoder_grad_norm"  # before clipping
DECODER_GRAD_NORM = "train/decoder_grad_norm"
LATENT_NORM = "train/latent_norm"  # mean L2 norm of the batch's latents
LATENT_STD = "train/latent_std"  # per-dimension standard deviation over the batch, averaged
LATENT_RANK = "train/latent_effective_rank"  # exp(entropy of the centred batch's singular values)
MODULATION_STD = "train/modulation_std"  # how much the latent's scale and shift differ between images
DIAGNOSTICS = (ENCODER_GRAD_NORM, DECODER_GRAD_NORM, LATENT_NORM, LATENT_STD, LATENT_RANK, MODULATION_STD)
# ... per epoch (step = epoch) ...
EPOCH_SECONDS = "train/epoch_seconds"
IMAGES_PER_SECOND = "train/images_per_second"
# ... and with each evaluation (step = epoch): progress comparable across batch sizes and GPUs.
IMAGES_SEEN = "train/images_seen"
TRAIN_SECONDS = "train/seconds"


def latent_gap_at(timestep: int) -> str:
    """The latent gap measured at one timestep."""
    return f"{LATENT_GAP}_t{timestep}"


def factor_metric(factor: str) -> str:
    """The factor probe's score of one factor of variation."""
    return f"{FACTOR_PREFIX}{factor}"


def shown_order(metrics: dict[str, float]) -> list[tuple[str, float]]:
    """Metrics as lines show them: sorted by key, the factor probes after the others, so that a
    line starts with the probes and the latent gap whether or not the data set has factors."""
    return sorted(metrics.items(), key=lambda item: (item[0].startswith(FACTOR_PREFIX), item[0]))


# Tags. A sweep's trials carry TRIAL and STUDY and point at the sweep's run with PARENT_RUN;
# the sweep's own run carries SWEEP=SWEEP_PARENT.
RUN_DIR = "run_dir"
ERROR = "error"  # why the run stopped; never on a FINISHED run
ENDED = "ended"  # how the run's last process ended: one of ENDINGS
PREVIOUS_END = "previous_end"  # on a resumed run: how the process before this one ended
# On a run that continued a run directory whose MLflow run was gone (tracking.resume_without_record):
# the lost run's id, and the epoch this record starts at (the earlier epochs are not in it).
LOST_RECORD = "lost_record"
RECORD_STARTS_AT = "record_starts_at_epoch"
RESUME_CHANGES = "resume_changes"  # on a resumed run: the resumable settings changed (soda.rundir)
COMPILE = "compile"
RESUMED = "resumed"  # "true" once a later process continued the run
POINTS_LOGGED = "metric_points_logged"  # metric points the last process sent (checked against the store)
HOST, PID = "host", "pid"  # the process writing the run while it is live
TRIAL = "trial"
STUDY = "optuna_study"
TRIAL_STATE = "trial_state"
SWEEP = "sweep"
SWEEP_PARENT = "parent"
PARENT_RUN = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the trials under the sweep


# Each way a process ends, and the MLflow status its run ends with (soda.train.run).
ENDINGS = {
    "finished": "FINISHED",
    "failed": "FAILED",  # an exception, divergence included; ERROR says which
    "interrupted": "KILLED",  # SIGINT (Ctrl-C)
    "terminated": "KILLED",  # SIGTERM
    "preempted": "KILLED",  # SIGUSR1/SIGUSR2 after a checkpoint; SLURM requeues the job
    "pruned": "KILLED",  # a sweep's pruner stopped the trial (TRIAL_STATE=PRUNED)
    "tracking_lost": "FAILED",  # the store stopped answering (END_FILE; recorded on the next start)
}
# A process that ended without recording it (SIGKILL, out of memory, a lost node) leaves its run
# RUNNING; the next start in its run directory records it as PREVIOUS_END, the sweeper closes it.
LOST = "lost: the process ended without recording how (SIGKILL, out of memory or a lost node)"


def trial_tags(study: str, number: int, parent_run_id: str | None = None) -> dict[str, str]:
    """The tags that make a run trial `number` of `study` (and a child of the sweep's run)."""
    tags = {TRIAL: str(number), STUDY: str(study)}
    if parent_run_id:
        tags[PARENT_RUN] = parent_run_id
    return tags


def short_value(value: Any) -> str:
    """A value as a run name shows it: floats to 3 significant digits (0.000316), else as is."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def trial_run_name(study: str, number: int, params: dict[str, Any]) -> str:
    """A trial's MLflow run name: its study, number and values, each under the last part of its
    key (`augment_ablation #3: target=flip source=none seed=1`)."""
    values = " ".join(f"{re.split(r'[./@]', name)[-1]}={short_value(value)}" for name, value in params.items())
    return f"{study} #{number}" + (f": {values}" if values else "")


def run_name(settings: Any) -> str:
    """A run's MLflow name when tracking.run_name is null: what ran (`tiny shapes seed=0`), after
    its study and trial number in a sweep's trial whose sweeper named none."""
    what = f"{settings.model.name} {settings.dataset.name} seed={settings.seed}"
    sweep = settings.sweep
    return what if sweep.trial is None else f"{sweep.study_name} #{sweep.trial}: {what}"


def parent_tags(study: str) -> dict[str, str]:
    """The tags of a sweep's own run."""
    return {SWEEP: SWEEP_PARENT, STUDY: str(study)}


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


def git_state(repo: Path | None = None) -> dict[str, str]:
    """The commit that produced a run, and whether the work tree had uncommitted changes: by
    default those of the source tree this package was imported from (the code that ran)."""
    repo = repo if repo is not None else Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return {"git_sha": sha, "git_dirty": str(bool(status.strip())).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": "unknown", "git_dirty": "unknown"}


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts -> {"a.b.c": "value"} (lists kept whole, as their string)."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: str(tree)}


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


def check_reachable(uri: str) -> None:
    """Fail now, with what to do, if the tracking store cannot be written."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        reason = server_unreachable(uri)
        if reason:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({reason}); start it "
                f"(make mlflow-server), fix tracking.uri, or use tracking=local"
            )
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

    def check(self) -> None:
        """Fail before any work if the store cannot be read, or (creating the experiment when it
        is new) written."""
        check_reachable(self.uri)
        import mlflow

        try:
            get_or_create_experiment(mlflow.MlflowClient(self.uri), self.experiment, self.artifact_location)
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
            import mlflow

            if mlflow.active_run() is not None:  # created, then a write failed: not left RUNNING
                try:
                    mlflow.end_run(status="FAILED")
                except Exception:
                    pass
            raise self._unwritable(error) from None

    def _start(self, run_dir: Path, params: dict[str, str], config_yaml: str, tags: dict[str, str], epoch: int) -> str:
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        experiment_id = self._experiment_id(mlflow)
        run_dir = Path(run_dir)
        previous = self._previous_run(mlflow, experiment_id, run_dir)
        unrecorded_end = _take_end_file(run_dir)
        if previous is not None:
            ended = self._previous_end(mlflow.get_run(previous), unrecorded_end)
            run = mlflow.start_run(run_id=previous, log_system_metrics=self.system_metrics)
            self.resumed = True
            self._recorded_steps = self._last_steps(mlflow, previous)
            # The run is live again: how the earlier process ended moves to PREVIOUS_END.
            mlflow.set_tags({RESUMED: "true", PREVIOUS_END: ended[:5000]})
            _delete_tag(mlflow.MlflowClient(self.uri), previous, ERROR)
            log.info("continuing MLflow run %s (its previous process: %s)", previous, ended)
        else:
            # The run directory is a tag from the run's creation on, so a process killed before it
            # wrote mlflow_run_id still finds its run on restart instead of leaving it orphaned.
            run = mlflow.start_run(
                experiment_id=experiment_id,
                run_name=self.run_name,
                tags={"run_dir": str(run_dir.resolve()), **self._lost_record_tags(unrecorded_end, epoch)},
                log_system_metrics=self.system_metrics,
            )
            write_atomically(run_dir / RUN_ID_FILE, lambda handle: handle.write(f"{run.info.run_id}\n".encode()))
        # Written on a resumed run too when the first process died before writing them.
        recorded = mlflow.get_run(run.info.run_id)
        missing = {k: v for k, v in params.items() if k not in recorded.data.params}
        if missing:
            mlflow.log_params(missing)
        if not any(a.path == "config.yaml" for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)):
            mlflow.log_text(config_yaml, "config.yaml")
        mlflow.set_tags({**tags, **self.tags})
        self.run_id = run.info.run_id
        return self.run_id

    def _previous_run(self, mlflow, experiment_id: str, run_dir: Path) -> str | None:
        """The MLflow run this run directory already has: the id in its mlflow_run_id file, or
        else (killed between creating the run and writing the file) the newest run tagged with
        this directory."""
        id_file = run_dir / RUN_ID_FILE
        previous = id_file.read_text().strip() if id_file.exists() else ""
        if previous and self._run_exists(mlflow, previous):
            return previous
        where = str(run_dir.resolve())
        found = []
        if "'" not in where:
            found = mlflow.search_runs(
                experiment_ids=[experiment_id],
                filter_string=f"tags.run_dir = '{where}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
                output_format="list",
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
        import mlflow

        if not changes or self.run_id is None:
            return
        earlier = self._write(mlflow.get_run, self.run_id).data.tags.get(RESUME_CHANGES, "")
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        added = f"{now} " + ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changes.items())
        self._write(mlflow.set_tag, RESUME_CHANGES, "\n".join(filter(None, [earlier, added]))[-5000:])
        log.info("resumed with changed settings: %s", added)

    def _experiment_id(self, mlflow) -> str:
        return get_or_create_experiment(mlflow.MlflowClient(self.uri), self.experiment, self.artifact_location)

    @staticmethod
    def _run_exists(mlflow, run_id: str) -> bool:
        try:
            mlflow.get_run(run_id)
            return True
        except Exception:
            return False

    @staticmethod
    def _last_steps(mlflow, run_id: str) -> dict[str, int]:
        client = mlflow.MlflowClient()
        keys = mlflow.get_run(run_id).data.metrics.keys()
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
        deadline, pause = None, 1.0
        while True:
            try:
                with quick_http_failures(timeout=min(30.0, self.timeout_s)):
                    result = write(*args, **kwargs)
            except Exception as error:
                if not unanswered(error):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.timeout_s
                    log.warning(
                        "MLflow tracking store %s does not answer (%s); retrying for up to %s s (tracking.timeout_s)",
                        redact(self.uri),
                        first_line(error),
                        f"{self.timeout_s:g}",
                    )
                if now >= deadline:
                    self.lost_reason = (
                        f"MLflow tracking store {redact(self.uri)} stopped answering for {self.timeout_s:g} s "
                        f"(tracking.timeout_s; last: {first_line(error, limit=120)})"
                    )
                    self.lost = TrackingLost(
                        f"{self.lost_reason}; the last checkpoint is kept: bring the store back and re-run "
                        f"the same command to continue MLflow run {self.run_id} from it"
                    )
                    raise self.lost from None
                time.sleep(min(pause, deadline - now))
                pause = min(2 * pause, 15.0)
                continue
            if deadline is not None:
                log.warning("MLflow tracking store %s answers again", redact(self.uri))
            return result

    def abandon(self, run_dir: Path, where: str) -> None:
        """The store is gone: leave the run without contacting it again, and say in the run
        directory how this process ended (END_FILE, `where`: e.g. `in epoch 3`), for the record
        of the next start."""
        import mlflow

        write_end_file(run_dir, self.run_id, f"tracking_lost: {self.lost_reason} {where}")
        # One quick try to say it in the store as well (it may be back); end_run forgets the run
        # even when the store does not answer, so nothing waits on it again.
        with quick_http_failures(timeout=2), contextlib.suppress(Exception):
            client = mlflow.MlflowClient(self.uri)
            client.set_tag(self.run_id, ERROR, f"{self.lost_reason} {where}"[:5000])
            client.set_tag(self.run_id, ENDED, "tracking_lost")
        with quick_http_failures(timeout=2), contextlib.suppress(Exception):
            mlflow.end_run(status=ENDINGS["tracking_lost"])

    def fail_from_another_thread(self, error: str) -> None:
        """End the run FAILED from a thread other than the one that started it (MLflow's active
        run is the starting thread's): soda.heartbeat's watch, before the process leaves."""
        import mlflow

        if self.run_id is None:
            return
        client = mlflow.MlflowClient(self.uri)
        self._write(client.set_tag, self.run_id, ERROR, error[:5000])
        self._write(client.set_tag, self.run_id, ENDED, "failed")
        self._write(client.set_terminated, self.run_id, ENDINGS["failed"])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import mlflow

        fresh = {k: float(v) for k, v in metrics.items() if step > self._recorded_steps.get(k, -1)}
        if fresh:
            mark("mlflow.log_metrics")
            self._write(mlflow.log_metrics, fresh, step=step)
            self.points_logged += len(fresh)

    def log_artifact(self, path: Path, folder: str) -> None:
        import mlflow

        self._write(mlflow.log_artifact, str(path), folder)

    def finish(self, ended: str, error: str | None = None, tags: dict[str, str] | None = None) -> None:
        """End the run as `ended` (a key of ENDINGS) says, with its MLflow status and tags."""
        import mlflow

        active = mlflow.active_run()
        if active is None:
            return
        run_id, client, status = active.info.run_id, mlflow.MlflowClient(self.uri), ENDINGS[ended]
        # Each write on its own (a retried write must not repeat one the store already took).
        if error and status != "FINISHED":
            self._write(client.set_tag, run_id, ERROR, error[:5000])
        elif status == "FINISHED":
            self._write(_delete_tag, client, run_id, ERROR)  # a finished run claims no error
        # Points sent by this process (a resumed run's earlier points were sent by earlier ones).
        for key, value in {**(tags or {}), ENDED: ended, POINTS_LOGGED: str(self.points_logged)}.items():
            self._write(client.set_tag, run_id, key, value)
        self._write(client.set_terminated, run_id, status)
        with quick_http_failures(timeout=5), contextlib.suppress(Exception):
            mlflow.end_run(status=status)  # MLflow's side: its active run and system metrics stop


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
