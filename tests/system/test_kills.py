"""Kills: the demo experiment SIGKILLed at seeded random moments, a third of them timed inside a
checkpoint write and a third inside an MLflow metric write (soda/faults.py marks), and restarted
each time. Every run must finish once in MLflow with every epoch's evaluation exactly once, its
params and config, never load a partial checkpoint, leave no temporary file, and end with final
metrics exactly equal to an uninterrupted run's.

`make test` runs 3 kills (one of each kind); `make faults` 17 more (20 in all)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.system.campaign import (
    TINY,
    Attempt,
    Store,
    environment,
    launch_command,
    run_and_maybe_kill,
    tracking_overrides,
)

EPOCHS = 4
EXPERIMENT = "faults-kills"
MARKS = ("checkpoint.write", "mlflow.log_metrics")


def command(work: Path, run_dir: Path) -> list[str]:
    return launch_command(
        *TINY, f"schedule.epochs={EPOCHS}", *tracking_overrides(work, EXPERIMENT), f"hydra.run.dir={run_dir}"
    )


@dataclass
class Reference:
    finals: dict[str, float | None]
    seconds: float


@pytest.fixture(scope="module")
def reference(work: Path) -> Reference:
    """The uninterrupted run every killed one must end equal to."""
    run_dir = work / "reference"
    attempt = run_and_maybe_kill(command(work, run_dir), environment(work), delay=None)
    assert attempt.returncode == 0, f"the uninterrupted run failed:\n{attempt.output[-3000:]}"
    runs = Store(f"sqlite:///{work}/mlflow.db", EXPERIMENT).runs_of(run_dir)
    assert len(runs) == 1, f"{len(runs)} MLflow runs for the uninterrupted run"
    return Reference(Store.finals(runs[0]), attempt.seconds)


@dataclass
class Round:
    """One run directory: killed and restarted until it finished (or the kills ran out)."""

    run_dir: Path
    attempts: list[Attempt] = field(default_factory=list)


def kill_and_restart(work: Path, name: str, kills: int, seed: int, seconds: float, record) -> list[Round]:
    """`kills` SIGKILLs, each followed by a restart of the same command; a run that finishes before
    its kill lands ends its round, and the next kill goes to a fresh run directory."""
    rng = random.Random(seed)
    plan: list[str | None] = [mark for mark in MARKS for _ in range(kills // 3)]
    plan += [None] * (kills - len(plan))  # at a random time
    rng.shuffle(plan)
    env = environment(work, SODA_FAULT_MARKS=",".join(MARKS))
    rounds: list[Round] = []
    done = 0
    while done < kills:
        this = Round(work / f"{name}-{len(rounds)}")
        rounds.append(this)
        while done < kills:
            mark = plan[done]
            if mark is None:
                attempt = run_and_maybe_kill(command(work, this.run_dir), env, delay=rng.uniform(0.5, seconds))
            else:
                # Not always the first write of the process, and at a random instant inside it.
                attempt = run_and_maybe_kill(
                    command(work, this.run_dir), env, mark, occurrence=rng.randint(1, 4), delay=rng.uniform(0.0, 0.05)
                )
            this.attempts.append(attempt)
            if not attempt.killed:
                break  # it finished before the kill came: this round is over
            done += 1
            record.counts["kills"] += 1
            record.counts[mark or "random"] += 1
        else:  # the kills are spent: restart once more and let it finish
            this.attempts.append(run_and_maybe_kill(command(work, this.run_dir), env, delay=None))
    record.counts["runs"] += len(rounds)
    return rounds


@pytest.mark.parametrize(
    "kills, seed",
    [pytest.param(3, 0, id="3-kills"), pytest.param(17, 1, id="17-kills", marks=pytest.mark.slow)],
)
def test_killed_runs_resume_to_the_uninterrupted_result(work, reference, record, kills, seed):
    rounds = kill_and_restart(work, f"killed-{seed}", kills, seed, reference.seconds, record)
    store = Store(f"sqlite:///{work}/mlflow.db", EXPERIMENT)
    for this in rounds:
        what = this.run_dir.name
        last = this.attempts[-1]
        assert last.returncode == 0, f"{what}: the last restart failed:\n{last.output[-3000:]}"
        everything = "".join(attempt.output for attempt in this.attempts)
        assert "is unreadable" not in everything and "CheckpointError" not in everything, (
            f"{what}: a restart met a damaged checkpoint"
        )
        leftovers = sorted(path.name for path in (this.run_dir / "checkpoints").glob("*.tmp"))
        assert not leftovers, f"{what}: temporary checkpoint files left behind: {leftovers}"
        runs = store.runs_of(this.run_dir)
        assert len(runs) == 1, f"{what}: {len(runs)} MLflow runs for one run directory"
        store.assert_complete(runs[0], EPOCHS, what)
        assert store.finals(runs[0]) == reference.finals, f"{what}: final metrics differ from the uninterrupted run's"
