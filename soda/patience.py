"""Waiting for a store that does not answer: the Optuna storage of a sweep (soda.sweep) and the
MLflow tracking store of a run (soda.tracking) retry the same way."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

Result = TypeVar("Result")


def patiently(
    call: Callable[[], Result],
    *,
    timeout_s: float,
    reason_of: Callable[[Exception], str | None],
    warn: Callable[[str], None],
    give_up: Callable[[str, Exception], BaseException],
    answered_again: Callable[[], None] | None = None,
    first_pause_s: float = 1.0,
    longest_pause_s: float = 15.0,
) -> Result:
    """`call()`, tried again while it fails because the store does not answer, for up to
    `timeout_s` from the first such failure.

    `reason_of(error)` says why the store did not answer, or None when `error` is the call's own
    (which then passes through at once). The first failure is one `warn(reason)`; the pauses
    between tries double from `first_pause_s` up to `longest_pause_s`; at the deadline,
    `give_up(reason, error)` makes the exception that is raised. `answered_again()` is called
    when a call succeeds after failures."""
    deadline, pause = None, first_pause_s
    while True:
        try:
            result = call()
        except Exception as error:
            reason = reason_of(error)
            if reason is None:
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + timeout_s
                warn(reason)
            if now >= deadline:
                failure = give_up(reason, error)
                break  # raised below, outside this handler: the failure says all, not the last error
            time.sleep(min(pause, deadline - now))
            pause = min(2 * pause, longest_pause_s)
            continue
        if deadline is not None and answered_again is not None:
            answered_again()
        return result
    raise failure from None
