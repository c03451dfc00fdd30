"""Which trials run, and their lifecycle: Optuna decides (ask), the launcher runs them, their
outcome is told back.

Up to `n_jobs` trials are in flight at once, a new one as soon as one ends. A trial that raises,
returns no usable objective, or whose job dies is recorded as failed, and the sweep goes on until
more than `allowed_failures` trials have failed. Ctrl-C or SIGTERM cancels the jobs in flight and
records their trials as interrupted. A sweep that stopped without that chance (killed) left trials
RUNNING in the study: `recover` marks them failed so that `plan` runs them again.

No `from __future__ import annotations` here: Hydra's plugin scan executes this module outside
sys.modules, and dataclasses cannot resolve string annotations then.
"""

import concurrent.futures
import logging
import math
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hydra.core.utils import JobReturn, JobStatus

from hydra_plugins.soda_sweeper.parent_run import ParentRun
from hydra_plugins.soda_sweeper.search_space import Dimension, cell_key, override_value
from soda.sweep import SweepError

log = logging.getLogger(__name__)

ERROR_ATTR = "error"  # trial user attribute: why the trial failed (read by the tests)
INTERRUPTED = "interrupted: the sweep stopped before the trial finished"
FINISHED_OK = ("COMPLETE", "PRUNED")


@dataclass
class SweepState:
    target: int  # trials the study should have finished (complete or pruned)
    done: int  # finished so far, earlier runs of the sweep included
    allowed_failures: int  # failures in this run that stop the sweep when exceeded
    failures: int = 0
    errors: list[str] = field(default_factory=list)  # one line per failed trial, for the summary

    def stopping(self, in_flight: int) -> bool:
        return self.failures > self.allowed_failures or self.done + in_flight >= self.target


def plan(trials, names: list[str], cells: list[dict[str, Any]] | None, n_trials: int | None):
    """(target, trials already finished, parameters to run first) for a study's `trials`.

    A grid (`cells`) runs each cell not finished yet; other samplers first run again the
    parameters of earlier failed trials, then ask the sampler for new ones."""
    done = [t for t in trials if t.state.name in FINISHED_OK]
    done_keys = {cell_key(t.params, names) for t in done}
    if cells is not None:
        target = min(n_trials or len(cells), len(cells))
        queue = [c for c in cells if cell_key(c, names) not in done_keys]
    else:
        target = n_trials
        queue = _retries(trials, names, done_keys)
    return target, len(done), queue[: max(0, target - len(done))]


def _retries(trials, names: list[str], done_keys: set) -> list[dict[str, Any]]:
    """Parameters of earlier failed trials that never succeeded, once each."""
    queue, seen = [], set(done_keys)
    for trial in trials:
        key = cell_key(trial.params, names)
        if trial.state.name == "FAIL" and set(trial.params) == set(names) and key not in seen:
            queue.append(dict(trial.params))
            seen.add(key)
    return queue


def recover(study, storage, parent: ParentRun) -> None:
    """Trials left running (or queued) by a sweep that stopped without finishing them are marked
    failed ("interrupted"); `plan` runs them again. `storage` is the study's opened storage."""
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        if trial.state == TrialState.WAITING:
            study.ask()  # takes the oldest waiting trial: that one (tell needs it running)
        storage.set_trial_user_attr(trial_id, ERROR_ATTR, INTERRUPTED)
        study.tell(trial.number, state=TrialState.FAIL)
        parent.close_child(trial.number, "KILLED", INTERRUPTED, trial.params)
        log.info("trial %d was interrupted earlier: marked failed, it will run again", trial.number)


def trial_overrides(
    fixed: list[str], params: dict[str, Any], study_name: str, storage: str, number: int, parent_run_id: str
) -> list[str]:
    """A trial's command line: the fixed overrides, its parameters, and where it reports to."""
    return [
        *fixed,
        *(f"{name}={override_value(value)}" for name, value in params.items()),
        f"sweep.study_name={override_value(study_name)}",
        f"sweep.storage={override_value(storage)}",
        f"sweep.trial={number}",
        f"sweep.parent_run_id={override_value(parent_run_id)}",
    ]


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
    ):
        self.study = study
        self.parent = parent
        self.launch = launch  # (overrides, trial number) -> the job's return, once it ended
        self.dimensions = dimensions
        self.fixed = fixed
        self.storage = storage  # as the trials open it (soda.sweep.open_storage)
        self.n_jobs = n_jobs
        self.n_objectives = len(study.directions)

    def run(self, queue: list[dict[str, Any]], grid: bool, state: SweepState) -> None:
        """Run `queue` first, then (not for a grid) trials the sampler asks for, until `state`
        says stop. Raises SweepError when interrupted, after recording the trials in flight."""
        distributions = {name: d.distribution for name, d in self.dimensions.items()}
        in_flight: dict[concurrent.futures.Future, Any] = {}
        # SIGTERM (scancel, a closing terminal) stops the sweep as Ctrl-C does.
        previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.n_jobs, thread_name_prefix="trial")
        try:
            while True:
                # Fill the free slots.
                while not state.stopping(len(in_flight)) and len(in_flight) < self.n_jobs:
                    if queue:
                        self.study.enqueue_trial(queue.pop(0))
                    elif grid:
                        break
                    trial = self.study.ask(distributions)
                    params = {name: trial.params[name] for name in self.dimensions}
                    log.info(
                        "trial %d: %s", trial.number, " ".join(f"{n}={override_value(v)}" for n, v in params.items())
                    )
                    overrides = trial_overrides(
                        self.fixed, params, self.study.study_name, self.storage, trial.number, self.parent.run_id
                    )
                    in_flight[pool.submit(self.launch, overrides, trial.number)] = trial
                if not in_flight:
                    break
                # Wait for any trial to end, and tell Optuna how.
                finished, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    self._record(in_flight.pop(future), future, state)
        except KeyboardInterrupt:
            self._interrupt(in_flight)
            pool.shutdown(wait=True, cancel_futures=True)
            raise SweepError(
                f"sweep {self.study.study_name} interrupted: {state.done} of {state.target} trials finished, "
                f"{len(in_flight)} stopped; re-run the same command to resume"
            ) from None
        finally:
            signal.signal(signal.SIGTERM, previous_term)
        pool.shutdown(wait=True)

    def _record(self, trial, future: concurrent.futures.Future, state: SweepState) -> None:
        """Tell Optuna (and the parent run) how the trial ended: complete, pruned or failed."""
        import optuna
        from optuna.trial import TrialState

        try:
            result = future.result()
        except Exception as error:  # the job died, or could not be submitted
            self._fail(trial, f"job died: {_whole(error)}", state)
            return
        if result.status == JobStatus.COMPLETED:
            values = result.return_value
            values = values if isinstance(values, list | tuple) else [values]
            numbers = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
            if len(numbers) != self.n_objectives:
                message = f"objective is {result.return_value!r}, not {self.n_objectives} finite number(s)"
                self._fail(trial, message, state)
                return
            self.study.tell(trial, numbers)
            state.done += 1
            self.parent.trial_ended(trial.number, "COMPLETE", numbers)
            log.info("trial %d: complete, %s", trial.number, " ".join(f"{v:.4f}" for v in numbers))
            return
        # Private: JobReturn.return_value re-raises a failed job's exception *and* writes "Error
        # executing job" to stderr, which a pruned trial is not; Hydra has no other accessor.
        error = result._return_value
        if isinstance(error, optuna.TrialPruned):
            self.study.tell(trial, state=TrialState.PRUNED)
            state.done += 1
            self.parent.trial_ended(trial.number, "PRUNED", None)
            log.info("trial %d: pruned (%s)", trial.number, error)
            return
        self._fail(trial, f"{type(error).__name__}: {_whole(error)}", state)

    def _fail(self, trial, message: str, state: SweepState) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr(ERROR_ATTR, message[:4000])
        self.study.tell(trial, state=TrialState.FAIL)
        state.failures += 1
        state.errors.append(f"#{trial.number}: {message.splitlines()[0][:200]}")
        self.parent.close_child(trial.number, "FAILED", message, trial.params)
        self.parent.trial_ended(trial.number, "FAIL", None)
        log.warning("trial %d failed: %s", trial.number, message.splitlines()[0])

    def _interrupt(self, in_flight: dict) -> None:
        """Cancel the jobs in flight; their trials fail as interrupted, the parent run is KILLED."""
        from optuna.trial import TrialState

        from hydra_plugins.soda_launchers import inflight

        cancelled = inflight.cancel_all()
        log.warning("interrupted: cancelled %d job(s)", cancelled)
        message = "interrupted: the sweep was stopped"
        for trial in in_flight.values():
            trial.set_user_attr(ERROR_ATTR, message)
            self.study.tell(trial, state=TrialState.FAIL)
            self.parent.close_child(trial.number, "KILLED", message, trial.params)
        self.parent.finish(self.study, status="KILLED")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _whole(error: BaseException) -> str:
    """The whole message (a dead job's includes the tail of its error stream), for the records."""
    text = str(error).strip()
    return text[:4000] if text else type(error).__name__
