"""The outside services some tests need: the single-node SLURM cluster of `make slurm-up` and the
PostgreSQL of `make postgres-up`. Without one, its tests skip; in CI (CI=true) tests/conftest.py
turns that skip into a failure, so there they must really run."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
POSTGRES = os.environ.get("SODA_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5433")


def slurm_available() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


def postgres_available() -> bool:
    try:
        import psycopg

        psycopg.connect(f"{POSTGRES}/postgres", connect_timeout=3).close()
        return True
    except Exception:
        return False


def multi_node_available() -> bool:
    """The partition of namespaced compute nodes `make slurm-up` starts, with at least 3 of them up
    (a 2-node job, and a node to requeue it on when one is lost)."""
    if not slurm_available():
        return False
    shown = subprocess.run(["sinfo", "-h", "-p", "multi", "-N", "-o", "%N %T"], capture_output=True, text=True)
    return (
        sum(state.startswith(("idle", "mixed", "alloc")) for _, state in map(str.split, shown.stdout.splitlines())) >= 3
    )


needs_slurm = pytest.mark.skipif(not slurm_available(), reason="no SLURM cluster (run `make slurm-up`)")
needs_nodes = pytest.mark.skipif(
    not multi_node_available(), reason="no multi-node SLURM partition with 3 nodes up (run `make slurm-up`)"
)
needs_postgres = pytest.mark.skipif(not postgres_available(), reason="no PostgreSQL (run `make postgres-up`)")


class MlflowServer:
    """scripts/mlflow-server.sh on a PostgreSQL database of its own, on a free port; stop() and
    start() again keep its database and port (a server that goes away and comes back)."""

    def __init__(self, folder: Path, workers: int = 4, timeout: float = 180):
        import psycopg

        from tests.helpers import free_port

        database = f"mlflow_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {database}")
        port = free_port()
        self.env = {
            **os.environ,
            "SODA_MLFLOW_PORT": str(port),
            "SODA_MLFLOW_BACKEND": f"{POSTGRES}/{database}",
            "SODA_MLFLOW_ARTIFACTS": str(folder / "server-artifacts"),
            "SODA_MLFLOW_WORKERS": str(workers),
        }
        self.log_path = folder / "server.log"
        self.uri = f"http://127.0.0.1:{port}"
        self.timeout = timeout
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                ["bash", "scripts/mlflow-server.sh"],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200:
                    return
            except OSError:
                pass
            tail = self.log_path.read_text()[-3000:]
            assert self.process.poll() is None, f"the MLflow server exited: {tail}"
            assert time.monotonic() < deadline, f"the MLflow server did not answer: {tail}"
            time.sleep(1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=30)
        self.process = None


@contextlib.contextmanager
def mlflow_server(folder: Path, workers: int = 4, timeout: float = 180) -> Iterator[str]:
    """An MlflowServer on a fresh database; yields its URI once it answers, stops it afterwards.
    Its log is `folder`/server.log."""
    server = MlflowServer(folder, workers, timeout)
    try:
        server.start()
        yield server.uri
    finally:
        server.stop()
