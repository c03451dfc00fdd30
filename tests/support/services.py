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


needs_slurm = pytest.mark.skipif(not slurm_available(), reason="no SLURM cluster (run `make slurm-up`)")
needs_postgres = pytest.mark.skipif(not postgres_available(), reason="no PostgreSQL (run `make postgres-up`)")


@contextlib.contextmanager
def mlflow_server(folder: Path, workers: int = 4, timeout: float = 180) -> Iterator[str]:
    """scripts/mlflow-server.sh on a fresh PostgreSQL database of its own, on a free port; yields
    its URI once it answers, stops it afterwards. Its log is `folder`/server.log."""
    import psycopg

    from tests.helpers import free_port

    database = f"mlflow_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {database}")
    port = free_port()
    env = {
        **os.environ,
        "SODA_MLFLOW_PORT": str(port),
        "SODA_MLFLOW_BACKEND": f"{POSTGRES}/{database}",
        "SODA_MLFLOW_ARTIFACTS": str(folder / "server-artifacts"),
        "SODA_MLFLOW_WORKERS": str(workers),
    }
    log_path = folder / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            ["bash", "scripts/mlflow-server.sh"], cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None, f"the MLflow server exited: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the MLflow server did not answer: {log_path.read_text()[-3000:]}"
            time.sleep(1)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
