"""Which trials run, and their lifecycle: Optuna decides (ask), the launcher runs them, their
outcome is told back.

Up to `n_jobs` trials are in flight at once, a new one as soon as one ends. A trial that raises,
returns no usable objective, or whose job dies is recorded as failed, and the sweep goes on until
more than `allowed_failures` trials have failed. Ctrl-C or SIGTERM stops the sweep at its next
wait: it cancels the jobs in flight, waits for them to end, records their trials as interrupted
and says so in one line per job (a second Ctrl-C leaves at once). A sweep that stopped without
that chance (killed) left trials RUNNING in the study: `recover` marks them failed so that `plan`
runs them again.

Each trial's end is one line: `trial 7 COMPLETE, 3/12 done: 0.8123; log <file>` (or PRUNED and its
reason, or FAIL and its error's first line), where 3/12 counts the trials finished (complete or
pruned, earlier runs of the sweep included) against the sweep's target; a failed trial does not
count, it runs again. The sweeper ends with `summary`.

A custom search space (`hydra.sweeper.custom_search_space`) is called with each trial once the
sampler has chosen the parameters of `params`; what it suggests becomes overrides of that trial.

The Optuna storage going away (StorageLost: it did not answer for hydra.sweeper.storage_timeout_s)
stops the sweep as Ctrl-C does, except that nothing more can be told to Optuna: the jobs in flight
are cancelled and their trials' MLflow runs end KILLED saying the storage was lost (a run that
ended keeps its own record); the trials stay RUNNING in the study, and `recover`, in the run that
continues it, records each as its run says.

A trial whose run finished is complete whatever happens to its job or the sweeper afterwards: when
no result comes back (the job died or was stopped, the sweeper was killed), the trial's own MLflow
run says whether it ended complete (with its objective's values) or pruned (ParentRun.trial_result).

`plan`, `recover`, `summary` and a trial's overrides are in trials.py.
"""

import concurrent.futures
import logging
import math
import re
import signal
import threading
from collections.abc import Callable
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from launching import submission
from launching.adapters import hydra as hydra_adapter
from launching.sweeper.parent_run import END_ATTR, ParentRun
from launching.sweeper.search_space import Dimension, override_value
from launching.sweeper.trials import (
    ERROR_ATTR,
    STOPPED,
    STORAGE_LOST,
    TRACKING_LOST,
    SweepState,
    number_text,
    trial_overrides,
)
from soda.errors import TrackingError, TrackingLost, first_line
from soda.store import check_reachable
from soda.sweep import StorageLost, SweepError

log = logging.getLogger(__name__)

# A trial's error that says its tracking store went away (soda.tracking: a run's TrackingLost, or
# the check before a run): the sweeper then asks the store itself.
_STORE_GONE = re.compile(r"MLflow tracking (?:store|server) \S+ (?:stopped answering|is unreachable|cannot be used)")
# How often the sweeper looks at a stop request while it waits for trials: a signal handler that
# does not raise cannot end a blocking wait.
POLL_S = 0.5


class Scheduler:
    def __init__(
        self,
        study,
        parent: ParentRun,
        launch: Callable[[list[str], int], JobReturn],
        dimensions: dict[str, Dimension],
        fixed: list[str],
        storage: str,
        n_jobs: int,
        extend: Callable[[Any], None] | None = None,
    ):
        self.study = study
        self.parent = parent
        self.launch = launch  # (overrides, trial number) -> the job's return, once it ended
        self.dimensions = dimensions
        self.fixed = fixed
        self.storage = storage  # as the trials open it (soda.sweep.open_storage)
        self.n_jobs = n_jobs
        self.n_objectives = len(study.directions)
        self.extend = extend  # the custom search space, called with each trial (None: none)
        self.fixed_keys = {line.split("=", 1)[0].lstrip("+~") for line in fixed}

    def run(self, queue: list[dict[str, Any]], grid: bool, state: SweepState) -> None:
        """Run `queue` first, then (not for a grid) trials the sampler asks for, until `state`
        says stop. Raises SweepError when interrupted, after recording the trials in flight."""
        in_flight: dict[concurrent.futures.Future, Any] = {}
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.n_jobs, thread_name_prefix="trial")
        with _StopRequest() as stop:
            try:
                while not stop.requested:
                    # Fill the free slots.
                    while not stop.requested and not state.stopping(len(in_flight)) and len(in_flight) < self.n_jobs:
                        trial = self._next_trial(queue, grid)
                        if trial is None:
                            break
                        overrides = self._overrides(trial, state)
                        if overrides is not None:  # None: its custom search space failed (recorded)
                            in_flight[pool.submit(self.launch, overrides, trial.number)] = trial
                    if not in_flight:
                        break
                    # Wait for any trial to end (or a stop request), and tell Optuna how.
                    finished, _ = concurrent.futures.wait(
                        in_flight, timeout=POLL_S, return_when=concurrent.futures.FIRST_COMPLETED
                    )
                    for future in finished:
                        self._record(in_flight[future], future, state)
                        del in_flight[future]  # once recorded: a storage lost meanwhile leaves it in flight
                if stop.requested and (in_flight or not state.stopping(0)):
                    self._stop(in_flight, pool, state)
            except StorageLost:
                self._lost(in_flight, pool)
                raise
            except TrackingLost:
                self._tracking_lost(in_flight, pool)
                raise
            except KeyboardInterrupt:  # a second Ctrl-C while the first was being handled
                raise SweepError(
                    f"sweep {self.study.study_name} stopped at once: the trials in flight were not recorded; "
                    "re-run the same command to record them and resume"
                ) from None
        pool.shutdown(wait=True)

    def _next_trial(self, queue: list[dict[str, Any]], grid: bool):
        """The next trial to run: the queue's first parameters, else (not for a grid, whose queue
        is all of it) the sampler's; None when a grid's queue is empty."""
        if queue:
            self.study.enqueue_trial(queue.pop(0))
        elif grid:
            return None
        return self.study.ask({name: d.distribution for name, d in self.dimensions.items()})

    def _overrides(self, trial, state: SweepState) -> list[str] | None:
        """The trial's command line: the dimensions' values, then what the custom search space
        suggests. None when the custom search space raised or suggested a parameter the command
        line fixes: the trial is recorded failed, without a job."""
        if self.extend is not None:
            try:
                self.extend(trial)
            except StorageLost:
                raise
            except Exception as error:
                self._fail(trial, f"custom search space: {type(error).__name__}: {_whole(error)}", state)
                return None
        params = {name: trial.params[name] for name in self.dimensions}
        suggested = {name: value for name, value in trial.params.items() if name not in params}
        params |= suggested
        # Only the custom space's own suggestions can clash: a dimension swept on the command line
        # after a fixed value of the same key is that key's sweep, as in Hydra.
        clash = sorted(self.fixed_keys & {name.lstrip("+~") for name in suggested})
        if clash:
            self._fail(trial, f"custom search space suggested {', '.join(clash)}, which the command line fixes", state)
            return None
        log.info("trial %d launched: %s", trial.number, " ".join(f"{n}={override_value(v)}" for n, v in params.items()))
        study, parent_run_id = self.study.study_name, self.parent.run_id
        return trial_overrides(self.fixed, params, study, self.storage, trial.number, parent_run_id)

    def _record(self, trial, future: concurrent.futures.Future, state: SweepState) -> None:
        """Tell Optuna (and the parent run) how the trial ended: complete, pruned or failed."""
        try:
            result = future.result()
        except Exception as error:  # the job died, or could not be submitted
            if not self._recorded_by_run(trial, state):  # a job that died after its run ended
                self._fail(trial, f"job died: {_whole(error)}", state)  # its message names the log
            return
        self._tell(trial, *self._outcome(result), state, log_path=_log_path(result))

    def _outcome(self, result: JobReturn) -> tuple[str, Any]:
        """("COMPLETE", the objective's values), ("PRUNED", why) or ("FAIL", why) for a job's return."""
        import optuna

        if result.status == JobStatus.COMPLETED:
            values = result.return_value
            values = values if isinstance(values, list | tuple) else [values]
            numbers = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
            if len(numbers) != self.n_objectives:
                return "FAIL", f"objective is {result.return_value!r}, not {self.n_objectives} finite number(s)"
            return "COMPLETE", numbers
        # Not JobReturn.return_value: it writes "Error executing job" to stderr (hydra_adapter.job_outcome).
        error = hydra_adapter.job_outcome(result)
        if isinstance(error, optuna.TrialPruned):
            return "PRUNED", str(error)
        return "FAIL", f"{type(error).__name__}: {_whole(error)}"

    def _finished_result(self, trial, future: concurrent.futures.Future, state: SweepState) -> bool:
        """When the trial's job handed back a finished result (complete, or pruned), tell Optuna so
        and say True. A failure that comes back while the sweep stops is no result: the stop most
        likely caused it (Ctrl-C inside a checkpoint's write surfaces as another error), and the
        trial runs again either way."""
        if future.cancelled() or future.exception() is not None:
            return False
        outcome, detail = self._outcome(future.result())
        if outcome == "FAIL":
            return False
        self._tell(trial, outcome, detail, state, log_path=_log_path(future.result()))
        return True

    def _recorded_by_run(self, trial, state: SweepState) -> bool:
        """When the trial's own run ended complete (with its objective's values) or pruned, tell
        Optuna so and say True: its job ended after the run did, without handing the result over."""
        result = self.parent.trial_result(trial.number)
        if result is None:
            return False
        outcome, values = result
        if outcome == "COMPLETE" and len(values) != self.n_objectives:
            return False
        self._tell(trial, outcome, values if outcome == "COMPLETE" else "its run was pruned", state)
        return True

    def _tell(self, trial, outcome: str, detail: Any, state: SweepState, log_path: str | None = None) -> None:
        """Record `outcome` with its detail (as `_outcome` gives them); `log_path`: the job's log."""
        if outcome == "COMPLETE":
            self._complete(trial, detail, state, log_path)
        elif outcome == "PRUNED":
            self._pruned(trial, detail, state, log_path)
        else:
            self._fail(trial, detail, state, log_path)

    def _complete(self, trial, values: list[float], state: SweepState, log_path: str | None = None) -> None:
        self.study.tell(trial, values)
        state.done += 1
        self.parent.trial_ended(trial.number, "COMPLETE", values)
        _progress(trial.number, "COMPLETE", state, ", ".join(number_text(v) for v in values), log_path)

    def _pruned(self, trial, reason: str, state: SweepState, log_path: str | None = None) -> None:
        from optuna.trial import TrialState

        self.study.tell(trial, state=TrialState.PRUNED)
        state.done += 1
        self.parent.trial_ended(trial.number, "PRUNED", None)
        _progress(trial.number, "PRUNED", state, reason or "pruned", log_path)

    def _fail(self, trial, message: str, state: SweepState, log_path: str | None = None) -> None:
        from optuna.trial import TrialState

        self._raise_if_the_store_is_gone(trial, message)
        trial.set_user_attr(ERROR_ATTR, message[:4000])
        self.study.tell(trial, state=TrialState.FAIL)
        state.failures += 1
        state.errors.append(f"#{trial.number}: {message.splitlines()[0][:200]}")
        self.parent.close_child(trial.number, "FAILED", message, trial.params)
        self.parent.trial_ended(trial.number, "FAIL", None)
        _progress(trial.number, "FAIL", state, message.splitlines()[0], log_path)

    def _stop(self, in_flight: dict, pool: concurrent.futures.ThreadPoolExecutor, state: SweepState) -> None:
        """Ctrl-C or SIGTERM: cancel the jobs in flight and wait until each has ended. A trial whose
        job handed back a finished result, or whose own run ended complete or pruned, is recorded
        as such; each other one failed as interrupted, to run again, with one line saying so. The
        parent run ends KILLED; raises SweepError with the summary."""
        from optuna.trial import TrialState

        job_ids = submission.cancel_in_flight()  # {trial (Hydra job) number: job id}
        pool.shutdown(wait=True, cancel_futures=True)  # each launch returns once its job has ended
        stopped = 0
        for future, trial in in_flight.items():
            if self._finished_result(trial, future, state) or self._recorded_by_run(trial, state):
                continue
            trial.set_user_attr(ERROR_ATTR, STOPPED)
            self.study.tell(trial, state=TrialState.FAIL)
            self.parent.close_child(trial.number, "KILLED", STOPPED, trial.params)
            stopped += 1
            job = f" (job {job_ids[trial.number]})" if trial.number in job_ids else ""
            log.warning("trial %d%s: stopped; it will run again when you re-run the command", trial.number, job)
        self.parent.finish(self.study, status="KILLED")
        raise SweepError(
            f"sweep {self.study.study_name} interrupted: {state.done} of {state.target} trials finished, "
            f"{stopped} stopped; re-run the same command to resume"
        )

    def _raise_if_the_store_is_gone(self, trial, message: str) -> None:
        """A trial that failed because the MLflow tracking store went away stops the sweep (every
        trial after it would fail the same way) when the store still does not answer: TrackingLost.
        The trial is not told to Optuna: it stays running there, and the run that continues the
        sweep records it as interrupted (`recover`) and runs it again."""
        uri = getattr(self.parent, "uri", None)
        if uri is None or not _STORE_GONE.search(message):
            return
        try:
            check_reachable(uri)
            return  # it answers again: an ordinary failure
        except TrackingError as error:
            reason = first_line(error, limit=300)
        raise TrackingLost(
            f"sweep {self.study.study_name} stopped: trial {trial.number} lost the MLflow tracking store, "
            f"and it still does not answer ({reason}); the trials in flight were stopped: bring the store back "
            "and re-run the same command to continue the study"
        )

    def _tracking_lost(self, in_flight: dict, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        """The tracking store was lost: cancel the jobs in flight and wait until each has ended.
        Nothing can be written to MLflow; the study says why the sweep stopped (END_ATTR), and the
        trials in flight stay running in it, for `recover` to record when the sweep continues."""
        job_ids = submission.cancel_in_flight()
        pool.shutdown(wait=True, cancel_futures=True)
        self.study.set_user_attr(END_ATTR, TRACKING_LOST)
        for trial in in_flight.values():
            job = f" (job {job_ids[trial.number]})" if trial.number in job_ids else ""
            log.warning(
                "trial %d%s: stopped, as the MLflow tracking store was lost; it will run again", trial.number, job
            )

    def _lost(self, in_flight: dict, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        """The storage was lost: cancel the jobs in flight, wait until each has ended, and end the
        MLflow run of each trial that did not end on its own (see the module docstring)."""
        job_ids = submission.cancel_in_flight()
        pool.shutdown(wait=True, cancel_futures=True)
        for trial in in_flight.values():
            if self.parent.trial_result(trial.number) is not None:
                continue  # its run ended complete or pruned: kept when the sweep continues
            self.parent.close_child(trial.number, "KILLED", STORAGE_LOST, trial.params)
            job = f" (job {job_ids[trial.number]})" if trial.number in job_ids else ""
            log.warning("trial %d%s: stopped, as the Optuna storage was lost; it will run again", trial.number, job)


class _StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (scancel, `kill`, a closing terminal) while trials run. The
    first asks the scheduler to stop at its next wait, so that no trial's end is half-recorded; a
    second one raises KeyboardInterrupt at once. Signal handlers belong to the main thread: in
    another one (never the case under Hydra) the defaults stay."""

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def _progress(number: int, outcome: str, state: SweepState, detail: str, log_path: str | None) -> None:
    """The line that says a trial ended (a failure as a warning)."""
    level = logging.WARNING if outcome == "FAIL" else logging.INFO
    where = f"; log {log_path}" if log_path else ""
    log.log(level, "trial %d %s, %d/%d done: %s%s", number, outcome, state.done, state.target, detail, where)


def _log_path(result: JobReturn) -> str | None:
    """The log file of the job that returned `result` (Hydra's job log), or None when unknown."""
    hydra_cfg = result.hydra_cfg
    if hydra_cfg is None:
        return None
    try:
        path = OmegaConf.select(hydra_cfg, "hydra.job_logging.handlers.file.filename", default=None)
        return str(path or OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir", default=None) or "") or None
    except Exception:  # an interpolation only the job could resolve: no path rather than no line
        return None


def _whole(error: BaseException) -> str:
    """The whole message (a dead job's includes the tail of its error stream), for the records."""
    text = str(error).strip()
    return text[:4000] if text else type(error).__name__
