"""Failing trials: an 8-trial sweep in which one trial raises (its data is missing), one diverges
to NaN and one is SIGKILLed while it trains. The other 5 must finish; the 3 must be FAIL in Optuna
and FAILED in MLflow, each with its error; and the same command again must retry only those 3."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest

from launching.sweeper.trials import ERROR_ATTR
from soda.record import ERROR, LINEAR_ACC, PID, TRAIN_LOSS, TRIAL
from soda.sweep import open_storage
from tests.system.campaign import REPO, TINY, Store, environment, launch_command, tracking_overrides

pytestmark = pytest.mark.slow

EXPERIMENT = "faults-trials"
STUDY = "faults_trials"
SWEEP = f"""# @package _global_
defaults:
  - override /hydra/sweeper: soda_optuna
objective: {LINEAR_ACC}
sweep:
  study_name: {STUDY}
  n_jobs: 2
  max_failure_rate: 0.5
hydra:
  sweeper:
    direction: maximize
    sampler:
      name: grid
    params:
      +campaign: choice(ok1, ok2, ok3, ok4, ok5, raises, diverges, killed)
"""
# Each option is a normal config; three of them fail at run time, as real mistakes do.
OPTIONS = {
    **{f"ok{i}": f"seed: {i}\n" for i in range(1, 6)},
    # Data that is not there: a DataError once the trial runs (composing it, as the sweeper does
    # before launching, cannot know).
    "raises": "defaults:\n  - override /dataset: imagefolder\nseed: 6\ndataset:\n  root: /nonexistent/soda-faults\n",
    "diverges": "seed: 7\nschedule:\n  decoder_lr: 1.0e+12\n",  # the loss turns NaN: DivergenceError
    "killed": "seed: 13\n",  # SIGKILLed while it trains (first sweep only)
}
ERRORS = {
    "raises": "not found under /nonexistent/soda-faults",
    "diverges": f"{TRAIN_LOSS} is nan",
    "killed": "job died",
}


@dataclass
class Sweep:
    work: Path
    command: list[str]
    first: tuple | None = None  # states() after the first sweep

    def run(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command, cwd=REPO, env=environment(self.work), capture_output=True, text=True, timeout=1800
        )

    def states(self) -> tuple[dict[str, list[tuple[str, str]]], dict[str, list[tuple[str, str]]]]:
        """Per option: (state, error) of its Optuna trials, and (status, error) of their MLflow runs
        (found by their trial number: a trial that died before its run started has the run the
        sweeper made for it, without the trial's params)."""
        study = optuna.load_study(study_name=STUDY, storage=open_storage(f"{self.work}/optuna.log"))
        run_of = {run.data.tags[TRIAL]: run for run in Store(self.uri, EXPERIMENT).trials()}
        trials: dict[str, list[tuple[str, str]]] = {}
        runs: dict[str, list[tuple[str, str]]] = {}
        for trial in study.trials:
            option = trial.params["+campaign"]
            trials.setdefault(option, []).append((trial.state.name, trial.user_attrs.get(ERROR_ATTR, "")))
            run = run_of.get(str(trial.number))
            if run is not None:
                runs.setdefault(option, []).append((run.info.status, run.data.tags.get(ERROR, "")))
        return trials, runs

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.work}/mlflow.db"


def kill_when_training(sweep: Sweep, process: subprocess.Popen, seed: int) -> None:
    """SIGKILL the trial with this seed once it trains (its pid is an MLflow tag), as the kernel's
    OOM killer would."""
    store = Store(sweep.uri, EXPERIMENT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        runs = store.runs(f"params.seed = '{seed}' and attributes.status = 'RUNNING'")
        if runs and PID in runs[0].data.tags:
            time.sleep(2)
            os.kill(int(runs[0].data.tags[PID]), signal.SIGKILL)
            return
        time.sleep(0.2)
    pytest.fail(f"never saw the trial with seed {seed} training")


@pytest.fixture(scope="module")
def first_sweep(work: Path) -> Sweep:
    """The sweep, once, with one of its trials killed while it trains."""
    search = work / "conf"
    (search / "sweep").mkdir(parents=True)
    (search / "campaign").mkdir(parents=True)
    (search / "sweep" / "faults_trials.yaml").write_text(SWEEP)
    for name, text in OPTIONS.items():
        (search / "campaign" / f"{name}.yaml").write_text("# @package _global_\n" + text)
    sweep = Sweep(
        work,
        launch_command(
            "-m",
            f"hydra.searchpath=[file://{search}]",
            "sweep=faults_trials",
            *TINY,
            "schedule.epochs=2",
            *tracking_overrides(work, EXPERIMENT),
            f"sweep.storage={work}/optuna.log",
            f"hydra.sweep.dir={work}/sweep",
        ),
    )
    process = subprocess.Popen(
        sweep.command, cwd=REPO, env=environment(work), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        kill_when_training(sweep, process, seed=13)
        output, _ = process.communicate(timeout=1800)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, f"the sweep exited {process.returncode}:\n{output[-3000:]}"
    sweep.first = sweep.states()
    return sweep


def test_failed_trials_are_recorded_with_their_errors(first_sweep):
    trials, runs = first_sweep.first
    for option in OPTIONS:
        failed = option in ERRORS
        assert [state for state, _ in trials.get(option, [])] == ["FAIL" if failed else "COMPLETE"], (
            f"{option}: Optuna trials {trials.get(option)}"
        )
        assert [status for status, _ in runs.get(option, [])] == ["FAILED" if failed else "FINISHED"], (
            f"{option}: MLflow runs {runs.get(option)}"
        )
        if failed:
            assert ERRORS[option] in trials[option][0][1], f"{option}: Optuna's error {trials[option][0][1]!r}"
            assert ERRORS[option] in runs[option][0][1], f"{option}: MLflow's error {runs[option][0][1]!r}"


def test_the_same_command_again_retries_only_the_failed_trials(first_sweep):
    result = first_sweep.run()
    assert result.returncode == 0, f"the re-run exited {result.returncode}:\n{result.stderr[-3000:]}"
    trials, runs = first_sweep.states()
    assert sorted(option for option, got in trials.items() if len(got) > 1) == sorted(ERRORS), trials
    assert [state for state, _ in trials["killed"]] == ["FAIL", "COMPLETE"], trials["killed"]
    assert sum(len(got) for got in runs.values()) == len(OPTIONS) + len(ERRORS), runs
