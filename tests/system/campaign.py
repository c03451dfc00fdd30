"""What the fault campaigns share: the tiny configuration, the public command run as a real
process (and killed when asked), and the record read back from the tracking store."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow

from soda import faults
from soda.record import KNN_ACC, LINEAR_ACC, RECON_MSE, RUN_DIR, TRAIN_LOSS, TRIAL
from soda.store import STORE_DIR_ENV, SWEEP_STORAGE_ENV, TRACKING_URI_ENV

REPO = Path(__file__).resolve().parents[2]

# A few seconds per epoch on two CPU cores: the demo's data and model, smaller.
TINY = [
    "experiment=demo",
    "dataset.train_size=384",
    "dataset.test_size=128",
    "schedule.batch_size=64",
    "schedule.log_every=2",
    "schedule.checkpoint_every=1",
    "eval.every=1",
    "eval.at_start=false",
    "eval.batch_size=128",
    "eval.probe_epochs=3",
    "eval.num_reconstructions=2",
    "eval.sample_steps=3",
]
# What a finished run ends with; an interrupted run must end with exactly the same values.
FINAL_METRICS = (KNN_ACC, LINEAR_ACC, RECON_MSE)


def launch_command(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "launch.py"), *args]


def tracking_overrides(work: Path, experiment: str) -> list[str]:
    """The embedded store in `work`, and an experiment of the campaign's own."""
    return [
        f"tracking.uri=sqlite:///{work}/mlflow.db",
        f"tracking.artifact_location={work}/artifacts",
        f"tracking.experiment={experiment}",
    ]


def slurm_job(work: Path, name: str, experiment: str, epochs: int, *launcher: str) -> subprocess.Popen:
    """The tiny run as a SLURM job named `soda-faults-<name>` through the SLURM launcher, its sweep
    directory `<work>/<name>`, `launcher` the job's hydra.launcher overrides; the returned process
    (stdout and stderr together) waits for the job to end."""
    return subprocess.Popen(
        launch_command(
            "-m",
            *TINY,
            f"schedule.epochs={epochs}",
            *tracking_overrides(work, experiment),
            f"hydra.sweep.dir={work}/{name}",
            "hydra/launcher=slurm",
            *launcher,
            f"hydra.launcher.name=soda-faults-{name}",
        ),
        cwd=REPO,
        env=environment(work),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def environment(work: Path, **extra: str) -> dict[str, str]:
    """The caller's environment, minus what would send records elsewhere or announce fault marks;
    any store a command does not name goes into `work`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1", "TQDM_DISABLE": "1"}
    for name in (faults.ENV, TRACKING_URI_ENV, SWEEP_STORAGE_ENV, "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    env[STORE_DIR_ENV] = str(work)
    env.update(extra)
    return env


@dataclass
class Attempt:
    returncode: int
    output: str  # stdout and stderr together
    killed: bool
    seconds: float


def run_and_maybe_kill(
    command: list[str], env: dict, mark: str | None = None, occurrence: int = 1, delay: float | None = 0.0
) -> Attempt:
    """Run `command`; SIGKILL its process group `delay` seconds after the `occurrence`-th
    `soda-fault-mark <mark>` line (mark given), or `delay` seconds after the start (no mark).
    delay=None: never kill."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []
    reached = threading.Event()

    def read() -> None:
        seen = 0
        for line in process.stdout:
            lines.append(line)
            if mark is not None and line.strip() == f"soda-fault-mark {mark}":
                seen += 1
                if seen == occurrence:
                    reached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed = False
    if delay is not None:
        if mark is None:
            target = time.perf_counter() + delay
            while process.poll() is None and time.perf_counter() < target:
                time.sleep(0.01)
        else:
            while process.poll() is None and not reached.wait(0.01):
                pass
            if reached.is_set():
                time.sleep(delay)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            killed = True
    try:
        process.wait(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    reader.join(timeout=10)
    return Attempt(process.returncode, "".join(lines), killed, time.perf_counter() - started)


class Store:
    """One experiment of a tracking store, read back as the campaigns check it."""

    def __init__(self, uri: str, experiment: str):
        self.client = mlflow.MlflowClient(uri)
        self.experiment = experiment

    def runs(self, filter_string: str = "") -> list:
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            return []
        return self.client.search_runs([experiment.experiment_id], filter_string, max_results=1000)

    def runs_of(self, run_dir: Path) -> list:
        """The runs tagged with this run directory (one, when nothing was lost or doubled)."""
        return self.runs(f"tags.{RUN_DIR} = '{Path(run_dir).resolve()}'")

    def trials(self) -> list:
        """The runs of a sweep's trials (not the sweep's own run)."""
        return self.runs(f"tags.{TRIAL} != ''")

    def steps(self, run, key: str) -> list[int]:
        return sorted(point.step for point in self.client.get_metric_history(run.info.run_id, key))

    def points(self, run) -> int:
        """Metric points the store holds for a run (MLflow's own system metrics aside)."""
        return sum(
            len(self.client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics
            if not key.startswith("system/")
        )

    @staticmethod
    def finals(run) -> dict[str, float | None]:
        """The last evaluation as the store holds it (full precision, not the printed digits)."""
        return {key: run.data.metrics.get(key) for key in FINAL_METRICS}

    def assert_complete(self, run, epochs: int, what: str) -> None:
        """A run that finished once: FINISHED, each epoch's evaluation recorded exactly once, no
        training step recorded twice, its params and resolved config present."""
        assert run.info.status == "FINISHED", f"{what}: MLflow status {run.info.status}"
        for key in FINAL_METRICS:
            steps = self.steps(run, key)
            assert steps == list(range(1, epochs + 1)), f"{what}: {key} recorded at steps {steps}"
        losses = self.steps(run, TRAIN_LOSS)
        assert losses and len(losses) == len(set(losses)), f"{what}: {TRAIN_LOSS} steps {losses}"
        missing = {"seed", "model.arch"} - set(run.data.params)
        assert not missing, f"{what}: params {sorted(missing)} missing"
        artifacts = {artifact.path for artifact in self.client.list_artifacts(run.info.run_id)}
        assert "config.yaml" in artifacts, f"{what}: config.yaml missing from the run's artifacts {sorted(artifacts)}"


def store_snapshot(database: Path) -> tuple:
    """Every run, metric, param and tag row of an embedded store, read without writing to it: an
    earlier record must survive a bad input exactly as it was."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        return tuple(
            tuple(connection.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall())
            for table in ("runs", "metrics", "params", "tags")
        )
