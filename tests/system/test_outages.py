"""Campaign `outages`: the Optuna storage goes away under a sweep. A PostgreSQL of the test's own
(scripts/postgres-up.sh in a folder of its own, on a free port: the shared one stays up) is
stopped while a trial trains: the sweep ends within hydra.sweeper.storage_timeout_s in one line
that names the storage (no password) and what to do, the trial's and the sweep's MLflow runs say
the storage was lost, and the same command once PostgreSQL is back continues the same study and
the same parent run."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from launching.sweeper.trials import ERROR_ATTR
from soda import tracking
from soda.record import ERROR, PREVIOUS_END, SWEEP, SWEEP_PARENT
from soda.sweep import open_storage
from tests.helpers import free_port
from tests.support.services import needs_postgres
from tests.system.campaign import REPO, TINY, Store, environment, launch_command, tracking_overrides

pytestmark = [pytest.mark.postgres, needs_postgres]
TIMEOUT_S = 3
EXPERIMENT = "outages"
STUDY = "outage"
PINNED = ["augmentation/view@augmentation.target=reference", "augmentation/view@augmentation.source=reference"]


class Postgres:
    """A PostgreSQL cluster of the test's own, stopped and started again at will."""

    def __init__(self):
        # Not under pytest's folders, which only their owner may enter: PostgreSQL runs as `postgres`.
        self.folder = Path(tempfile.mkdtemp(prefix="soda-outages-postgres-"))
        self.env = {**os.environ, "SODA_PG_DIR": str(self.folder), "SODA_PG_PORT": str(free_port())}
        # trust authentication: the password is only there to be kept out of every message
        self.url = f"postgresql://postgres:hunter2@127.0.0.1:{self.env['SODA_PG_PORT']}/optuna"

    def _script(self, *args: str) -> None:
        done = subprocess.run(["bash", "scripts/postgres-up.sh", *args], cwd=REPO, env=self.env, capture_output=True)
        assert done.returncode == 0, done.stderr.decode()[-2000:]

    def start(self) -> None:
        self._script()

    def stop(self) -> None:
        self._script("down")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_postgres_stopped_mid_sweep_ends_it_in_one_line_and_the_rerun_continues_it(work, record):
    postgres = Postgres()
    postgres.start()
    sweep_dir = work / "sweep"
    command = launch_command(
        "-m",
        *TINY,
        "dataset.train_size=192",
        "schedule.epochs=2",
        "sweep=augment_ablation",
        *PINNED,
        "seed=range(0, 2)",
        f"sweep.study_name={STUDY}",
        f"sweep.storage={postgres.url}",
        "sweep.n_jobs=1",
        f"hydra.sweeper.storage_timeout_s={TIMEOUT_S}",
        "tracking.system_metrics=false",
        *tracking_overrides(work, EXPERIMENT),
        f"hydra.sweep.dir={sweep_dir}",
    )
    redacted = postgres.url.replace(":hunter2@", ":***@")
    try:
        # Trial 0 has started training (its MLflow run exists): now PostgreSQL goes.
        sweep = subprocess.Popen(
            command, cwd=REPO, env=environment(work), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 300
        while not (sweep_dir / "0" / tracking.RUN_ID_FILE).exists():
            assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()[0][-3000:]
            time.sleep(0.2)
        postgres.stop()
        stopped = time.monotonic()
        output = sweep.communicate(timeout=300)[0]
        waited = time.monotonic() - stopped
        record.facts.append(f"PostgreSQL stopped under a trial: the sweep ended {waited:.0f} s later")
        errors = _errors(output)
        assert sweep.returncode != 0 and len(errors) == 1, output[-3000:]
        assert errors[0] == output.strip().splitlines()[-1], output[-3000:]
        assert errors[0].startswith(f"error: Optuna storage {redacted} stopped answering (")
        assert errors[0].endswith(
            f"for {TIMEOUT_S} s; start it again and re-run the same command to continue the study"
        ), errors[0]
        leaks = [line for line in output.splitlines() if "hunter2" in line]  # the job listing included
        assert not leaks and "Traceback" not in output, output[-3000:]
        # The trial notices at its next report (after its epoch), waits TIMEOUT_S, fails; the sweeper
        # waits TIMEOUT_S to record that, then ends.
        assert waited < 120, waited

        store = Store(f"sqlite:///{work}/mlflow.db", EXPERIMENT)
        [parent] = store.runs(f"tags.{SWEEP} = '{SWEEP_PARENT}'")
        assert parent.info.status == "FAILED"
        assert parent.data.tags[ERROR].startswith(f"Optuna storage {redacted} stopped answering")
        [trial] = store.trials()
        assert trial.info.status in ("FAILED", "KILLED"), trial.info.status
        assert "Optuna storage" in trial.data.tags[ERROR], trial.data.tags[ERROR]

        # PostgreSQL back, the same command: the same study and parent run, each record true.
        postgres.start()
        rerun = subprocess.run(command, cwd=REPO, env=environment(work), capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        study = optuna.load_study(study_name=STUDY, storage=open_storage(postgres.url))
        states = [(t.params["seed"], t.state.name) for t in study.trials]
        assert states == [(0, "FAIL"), (0, "COMPLETE"), (1, "COMPLETE")], states
        assert "Optuna storage" in study.trials[0].user_attrs[ERROR_ATTR], study.trials[0].user_attrs
        [again] = store.runs(f"tags.{SWEEP} = '{SWEEP_PARENT}'")
        assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
        assert ERROR not in again.data.tags
        assert again.data.tags[PREVIOUS_END].startswith(f"failed: Optuna storage {redacted}")
    finally:
        postgres.remove()
