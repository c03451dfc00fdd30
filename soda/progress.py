"""What a person watching a run sees: the time left in each epoch line, stage lines while an
evaluation runs, and the small file that says how a finished run ended (read by the launchers).

Everything here is host-side arithmetic and logging, once per epoch or per stage: nothing reads
a value back from the device.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

from soda.files import write_atomically

RESULT_FILE = "result.json"  # in the run directory, once the run finished
UPDATE_EVERY_S = 10.0  # within a stage, at most one progress line this often


def plural(count: int, noun: str) -> str:
    """`1 trial`, `12 trials`."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def duration(seconds: float) -> str:
    """A duration as a person reads it: `41s`, `3m12s`, `9h05m`, `2d03h`."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _multiples(first: int, last: int, every: int) -> int:
    """How many of the epochs first..last are multiples of `every`."""
    return max(0, last // every - (first - 1) // every) if last >= first else 0


def eta_seconds(
    *,
    epoch: int,  # the epoch whose training just ended (its evaluation and checkpoint still to come)
    epochs: int,  # the run's last epoch
    epoch_seconds: float,  # one epoch's training, recently
    eval_seconds: float,  # one evaluation, recently (0 before the first)
    save_seconds: float,  # one checkpoint, recently (0 before the first)
    eval_every: int,
    checkpoint_every: int,
    seconds_left: float | None = None,  # of the training clock's budget; None = no budget
    eval_every_seconds: float | None = None,
) -> tuple[float, bool]:
    """(seconds until the run ends, whether the training clock's budget ends it first): the
    epochs left to train, and the evaluations and checkpoints still due, this epoch's included.
    The last epoch, the budget's included, is always evaluated and checkpointed."""
    training = (epochs - epoch) * epoch_seconds
    last, budget_ends_it = epochs, False
    if seconds_left is not None and epoch_seconds > 0 and seconds_left < training:
        training, budget_ends_it = max(0.0, seconds_left), True
        last = min(epochs, epoch + math.ceil(training / epoch_seconds))
    evaluations = _multiples(epoch, last, eval_every) + (last % eval_every != 0)
    if eval_every_seconds:
        evaluations = min(last - epoch + 1, evaluations + math.floor(training / eval_every_seconds))
    saves = _multiples(epoch, last, checkpoint_every) + (last % checkpoint_every != 0)
    return training + evaluations * eval_seconds + saves * save_seconds, budget_ends_it


# ---------------------------------------------------------------------------------------------
# Stage lines. The evaluation's pieces (soda.eval) call `stage` and `advance` wherever they run;
# the lines appear only inside `narrate`, which the training loop opens around an evaluation,
# so the same functions stay silent in tests, benchmarks and notebooks.


class _Narration:
    def __init__(self, title: str, logger: logging.Logger, every_s: float):
        self.title, self.logger, self.every_s = title, logger, every_s
        self.started = time.perf_counter()
        self.name, self.total, self.unit = "", None, ""
        self.last_line = self.started

    def line(self, text: str) -> None:
        now = time.perf_counter()
        self.last_line = now
        self.logger.info("%s: %s  %.1f s", self.title, text, now - self.started)

    def count(self, done: int) -> str:
        total = f"/{self.total}" if self.total is not None else ""
        return f"{self.name} {done}{total}{' ' + self.unit if self.unit else ''}"


_CURRENT: contextvars.ContextVar[_Narration | None] = contextvars.ContextVar("soda_narration", default=None)


@contextlib.contextmanager
def narrate(title: str, logger: logging.Logger, every_s: float = UPDATE_EVERY_S) -> Iterator[None]:
    """Inside the block, `stage` and `advance` log `<title>: <what>  <seconds since the block
    began> s` lines to `logger`: one as each stage begins, and at most one every `every_s`
    seconds while it goes on."""
    token = _CURRENT.set(_Narration(title, logger, every_s))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def elapsed() -> float | None:
    """Seconds since the innermost `narrate` began; None outside one."""
    narration = _CURRENT.get()
    return None if narration is None else time.perf_counter() - narration.started


def stage(name: str, total: int | None = None, unit: str = "") -> None:
    """A stage begins (`k-NN features`, `linear probe`); `total`: how many `unit`s it counts."""
    narration = _CURRENT.get()
    if narration is None:
        return
    narration.name, narration.total, narration.unit = name, total, unit
    narration.line(narration.count(0) if total is not None else name)


def advance(done: int) -> None:
    """`done` units of the current stage are done; a line if the last one is `every_s` old."""
    narration = _CURRENT.get()
    if narration is None or time.perf_counter() - narration.last_line < narration.every_s:
        return
    narration.line(narration.count(done))


# ---------------------------------------------------------------------------------------------
# The result of a finished run, for whoever launched it: read from the run directory, so that
# it needs neither the job's return value (a sweeper's objective) nor its log text.


def write_result(run_dir: Path, result: dict) -> None:
    """`<run_dir>/result.json`: how the run ended, its epoch, final metrics and objective."""
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    write_atomically(run_dir / RESULT_FILE, lambda handle: handle.write(text.encode()))


def read_result(run_dir: Path) -> dict | None:
    """What write_result wrote, or None when there is no readable result there."""
    try:
        result = json.loads((Path(run_dir) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None
