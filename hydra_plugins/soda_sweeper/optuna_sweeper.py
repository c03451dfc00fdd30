"""An Optuna sweeper for Hydra (`hydra/sweeper=optuna`), on current Optuna.

Optuna decides which trials run (ask), the configured launcher runs them (local processes or
SLURM jobs, `sweep.n_jobs` in flight at once, a new one as soon as one ends), and each trial's
returned objective is told back. A trial reports its probe accuracies while it trains (soda.sweep),
so a pruner can stop it early; a trial that raises or whose job dies is recorded as failed and the
sweep goes on until more than `max_failure_rate` of `n_trials` have failed. Running the same
command again with the same study name continues the study: finished trials are kept, interrupted
and failed ones are run again. MLflow gets one parent run per sweep, each trial a child run.

Search space: `params` maps a config path (or config group) to Hydra override syntax:
`choice(a, b)`, `range(0, 3)`, `interval(1e-4, 1e-2)`, `tag(log, interval(...))`, `tag(int,
interval(1, 8))`, or a plain value that every trial gets. Sweep-syntax overrides on the command
line (`seed=0,1,2`) add dimensions too. The `grid` sampler runs every combination of choice/range
values once; the others sample (`n_trials` required).

No `from __future__ import annotations` here: see hydra_plugins/soda_launchers/launchers.py.
"""

import concurrent.futures
import datetime
import itertools
import logging
import math
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional  # noqa: UP035 - OmegaConf needs typing's generics

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from soda.sweep import PRUNER_ATTR, SweepError, make_pruner, open_storage, redact

log = logging.getLogger(__name__)

SPACE_ATTR = "soda_search_space"  # study user attribute: {name: spec}, checked on resume
PARENT_ATTR = "soda_mlflow_parent"  # study user attribute: the sweep's MLflow run id
SAMPLERS = ("grid", "tpe", "random", "cmaes", "nsga2", "qmc")
FINISHED_OK = ("COMPLETE", "PRUNED")


@dataclass
class SamplerConf:
    name: str = "tpe"  # grid | tpe | random | cmaes | nsga2 | qmc
    seed: Optional[int] = None  # noqa: UP045
    options: Dict[str, Any] = field(default_factory=dict)  # noqa: UP006 - keyword arguments of the sampler


@dataclass
class PrunerConf:
    name: str = "none"  # none | median | percentile | successive_halving | hyperband | threshold | patient | wilcoxon
    options: Dict[str, Any] = field(default_factory=dict)  # noqa: UP006 - keyword arguments of the pruner


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.soda_sweeper.optuna_sweeper.OptunaSweeper"
    study_name: Optional[str] = None  # noqa: UP045 - null: a new name each time (no resume)
    storage: str = "optuna-journal.log"
    direction: Any = "maximize"  # or a list, one per objective
    n_trials: Optional[int] = None  # noqa: UP045
    n_jobs: int = 1
    max_failure_rate: float = 0.25
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    params: Dict[str, Any] = field(default_factory=dict)  # noqa: UP006


ConfigStore.instance().store(group="hydra/sweeper", name="soda_optuna_base", node=OptunaSweeperConf, provider="soda")


# ---------------------------------------------------------------------------------------------
# Search space


@dataclass
class Dimension:
    name: str  # the override key: a config path or group (with @package)
    spec: str  # as written
    distribution: Any  # an optuna distribution
    grid: Optional[List[Any]]  # noqa: UP006, UP045 - the values along a grid axis; None for an interval


def _primitive(value: Any, name: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise SweepError(f"sweep parameter {name}: {value!r} is not a plain value (number, string, bool or null)")


def parse_space(params: Dict[str, Any], arguments: List[str]):  # noqa: UP006
    """(dimensions by name, fixed overrides) from the sweep file's params and the command line."""
    import optuna.distributions as d

    parser = OverridesParser.create()
    lines = [f"{key}={_spec_text(value)}" for key, value in params.items()] + list(arguments)
    dimensions: Dict[str, Dimension] = {}  # noqa: UP006
    fixed: List[str] = []  # noqa: UP006
    for line in lines:
        try:
            override = parser.parse_override(line)
        except Exception as error:
            raise SweepError(f"sweep parameter {line!r}: {str(error).strip().splitlines()[0]}") from None
        name = override.get_key_element()
        spec = line.split("=", 1)[1] if "=" in line else line
        if not override.is_sweep_override():
            fixed.append(line)
            dimensions.pop(name, None)
            continue
        value = override.value()
        if isinstance(value, ChoiceSweep | RangeSweep):
            values = [_primitive(v, name) for v in override.sweep_iterator()]
            if not values:
                raise SweepError(f"sweep parameter {name}={spec} has no values (an empty grid)")
            if len(set(map(repr, values))) != len(values):
                raise SweepError(f"sweep parameter {name}={spec} repeats a value")
            if isinstance(value, RangeSweep) and all(isinstance(v, int) for v in values) and "log" not in value.tags:
                step = values[1] - values[0] if len(values) > 1 else 1
                distribution = d.IntDistribution(min(values), max(values), step=abs(step) or 1)
            else:
                distribution = d.CategoricalDistribution(values)
            dimensions[name] = Dimension(name, spec, distribution, values)
        elif isinstance(value, IntervalSweep):
            low, high, log_scale = value.start, value.end, "log" in value.tags
            if not low < high:
                raise SweepError(f"sweep parameter {name}={spec}: the interval is empty (needs low < high)")
            if log_scale and low <= 0:
                raise SweepError(f"sweep parameter {name}={spec}: a log interval needs low > 0")
            if "int" in value.tags:
                distribution = d.IntDistribution(int(low), int(high), log=log_scale)
            else:
                distribution = d.FloatDistribution(float(low), float(high), log=log_scale)
            dimensions[name] = Dimension(name, spec, distribution, None)
        else:
            raise SweepError(f"sweep parameter {name}={spec}: use choice(...), range(...) or interval(...)")
    return dimensions, fixed


def _spec_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_./\-]*")


def override_value(value: Any) -> str:
    """A value written so that Hydra's override parser reads it back with the same type."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if _BARE.fullmatch(text) and text.lower() not in ("true", "false", "null", "nan", "inf"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _cell_key(params: Dict[str, Any], names: List[str]) -> tuple:  # noqa: UP006
    return tuple(repr(params.get(name)) for name in names)


# ---------------------------------------------------------------------------------------------


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        study_name: Optional[str],  # noqa: UP045
        storage: str,
        direction: Any,
        n_trials: Optional[int],  # noqa: UP045
        n_jobs: int,
        max_failure_rate: float,
        sampler: Any,
        pruner: Any,
        params: Any,
    ):
        self.study_name = study_name or f"sweep-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        self.named = bool(study_name)
        self.storage_spec = str(storage)
        directions = [direction] if isinstance(direction, str) else list(direction)
        self.directions = [str(x).lower() for x in directions]
        self.n_trials = n_trials
        self.n_jobs = int(n_jobs)
        self.max_failure_rate = float(max_failure_rate)
        self.sampler_conf = OmegaConf.to_container(sampler, resolve=True) if OmegaConf.is_config(sampler) else sampler
        self.pruner_conf = OmegaConf.to_container(pruner, resolve=True) if OmegaConf.is_config(pruner) else pruner
        self.params = OmegaConf.to_container(params, resolve=True) if OmegaConf.is_config(params) else dict(params)
        self.config: Optional[DictConfig] = None  # noqa: UP045
        self.launcher = None
        self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        if hasattr(self.launcher, "jobs_at_once"):
            self.launcher.jobs_at_once = self.n_jobs  # local jobs share the cores between n_jobs trials

    # -----------------------------------------------------------------------------------------
    def sweep(self, arguments: List[str]) -> Any:  # noqa: UP006
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._check_settings()
        dimensions, fixed = parse_space(self.params, arguments)
        if not dimensions:
            raise SweepError("the sweep has no parameters to vary: set hydra.sweeper.params in the sweep file")
        names = list(dimensions)
        grid = self.sampler_conf["name"] == "grid"
        cells = self._grid_cells(dimensions) if grid else None
        self._validate(dimensions, fixed)

        storage = open_storage(self.storage_spec)
        study = self._study(storage, dimensions)
        tracker = _ParentRun(self.config, study, self)  # checks the tracking store before any job
        self._recover(study, tracker)

        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state.name in FINISHED_OK]
        done_keys = {_cell_key(t.params, names) for t in done}
        if grid:
            target = min(self.n_trials or len(cells), len(cells))
            queue = [c for c in cells if _cell_key(c, names) not in done_keys][: max(0, target - len(done))]
        else:
            target = self.n_trials
            queue = self._retries(trials, names, done_keys)[: max(0, target - len(done))]
        allowed_failures = math.floor(self.max_failure_rate * target)
        log.info(
            "study %s (%s): %d of %d trials already finished; %s; storage %s",
            self.study_name,
            self.sampler_conf["name"],
            len(done),
            target,
            f"{len(queue)} grid cells to run" if grid else f"{len(queue)} earlier trials to retry",
            redact(self.storage_spec),
        )
        if not self.named:
            log.info("no sweep.study_name: re-run with sweep.study_name=%s to resume this study", self.study_name)

        state = _SweepState(target=target, done=len(done), allowed_failures=allowed_failures)
        self._run(study, dimensions, fixed, queue, grid, tracker, state)
        summary = self._summary(study, state)
        tracker.finish(study, state)
        self._write_results(study, summary)
        print(summary, flush=True)
        if state.failures > allowed_failures:
            raise SweepError(
                f"{summary}; stopped: more than max_failure_rate={self.max_failure_rate} of {target} trials failed"
            )
        return [(t.number, t.state.name, t.values) for t in study.get_trials(deepcopy=False)]

    def _check_settings(self) -> None:
        if self.sampler_conf["name"] not in SAMPLERS:
            raise SweepError(f"sampler {self.sampler_conf['name']!r} is not known; allowed: {', '.join(SAMPLERS)}")
        bad = [x for x in self.directions if x not in ("maximize", "minimize")]
        if bad or not self.directions:
            raise SweepError(f"direction {bad or self.directions}: use maximize or minimize (one per objective)")
        objective = self.config.get("objective")
        objectives = [objective] if isinstance(objective, str) else list(objective or [])
        if objectives and len(objectives) != len(self.directions):
            raise SweepError(
                f"{len(self.directions)} direction(s) {self.directions} for {len(objectives)} objective(s) "
                f"{objectives}: give one direction per objective"
            )
        if self.sampler_conf["name"] != "grid" and self.n_trials is None:
            raise SweepError(f"sampler {self.sampler_conf['name']} needs sweep.n_trials (only a grid has an end)")
        if self.n_jobs > 1 and type(self.launcher).__name__ == "BasicLauncher":
            raise SweepError(
                f"sweep.n_jobs={self.n_jobs} needs a launcher that runs jobs in their own processes: "
                "hydra/launcher=local or hydra/launcher=slurm"
            )
        make_pruner(self.pruner_conf["name"], self.pruner_conf.get("options"))  # fails early on a bad pruner

    @staticmethod
    def _grid_cells(dimensions: Dict[str, Dimension]) -> List[Dict[str, Any]]:  # noqa: UP006
        interval = [d.name for d in dimensions.values() if d.grid is None]
        if interval:
            raise SweepError(f"the grid sampler needs choice(...) or range(...); {', '.join(interval)} is an interval")
        names = list(dimensions)
        return [
            dict(zip(names, values, strict=True))
            for values in itertools.product(*(d.grid for d in dimensions.values()))
        ]

    def _validate(self, dimensions: Dict[str, Dimension], fixed: List[str]) -> None:  # noqa: UP006
        """Compose (and check with the run's schema) a trial for every value each parameter can
        take, before any job is launched: a misspelt path or a value out of range fails here."""
        from soda.config import to_settings

        first = {name: (d.grid[0] if d.grid else d.distribution.low) for name, d in dimensions.items()}
        probes = [dict(first)]
        for name, dim in dimensions.items():
            values = dim.grid if dim.grid is not None else [dim.distribution.low, dim.distribution.high]
            probes.extend({**first, name: value} for value in values[1:])
        loader = self.hydra_context.config_loader
        for probe in probes:
            overrides = [*fixed, *(f"{n}={override_value(v)}" for n, v in probe.items())]
            try:
                composed = loader.load_sweep_config(self.config, overrides)
                with_hydra_removed = OmegaConf.masked_copy(composed, [k for k in composed if k != "hydra"])
                to_settings(with_hydra_removed)
            except Exception as error:
                changed = [f"{n}={override_value(v)}" for n, v in probe.items() if probe[n] != first[n]] or [
                    f"{n}={override_value(v)}" for n, v in probe.items()
                ]
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise SweepError(f"sweep trial with {' '.join(changed)} cannot be composed: {reason}") from None

    def _study(self, storage, dimensions: Dict[str, Dimension]):  # noqa: UP006
        import optuna

        sampler = self._sampler()
        space = {name: d.spec for name, d in dimensions.items()}
        try:
            study = optuna.create_study(
                study_name=self.study_name,
                storage=storage,
                sampler=sampler,
                pruner=make_pruner(self.pruner_conf["name"], self.pruner_conf.get("options")),
                directions=self.directions,
                load_if_exists=True,
            )
        except Exception as error:
            raise SweepError(f"study {self.study_name}: {str(error).splitlines()[0]}") from None
        if [d.name.lower() for d in study.directions] != self.directions:
            raise SweepError(
                f"study {self.study_name} exists with direction(s) {[d.name.lower() for d in study.directions]}, "
                f"not {self.directions}; use another sweep.study_name"
            )
        existing = study.user_attrs.get(SPACE_ATTR)
        if existing is not None and existing != space:
            raise SweepError(
                f"study {self.study_name} exists with another search space ({existing}); use another sweep.study_name"
            )
        study.set_user_attr(SPACE_ATTR, space)
        study.set_user_attr(PRUNER_ATTR, {"name": self.pruner_conf["name"], "options": self.pruner_conf.get("options")})
        return study

    def _sampler(self):
        import optuna

        s = optuna.samplers
        name, seed, options = self.sampler_conf["name"], self.sampler_conf.get("seed"), self.sampler_conf.get("options")
        classes = {
            "grid": s.RandomSampler,  # every parameter is fixed per trial (enqueued cells)
            "tpe": s.TPESampler,
            "random": s.RandomSampler,
            "cmaes": s.CmaEsSampler,
            "nsga2": s.NSGAIISampler,
            "qmc": s.QMCSampler,
        }
        try:
            return classes[name](seed=seed, **({} if name == "grid" else dict(options or {})))
        except TypeError as error:
            raise SweepError(f"sampler {name}: {error}") from None

    def _recover(self, study, tracker: "_ParentRun") -> None:
        """Trials left running (or queued) by a sweep that stopped without finishing them are
        marked failed ("interrupted"); the plan below runs them again."""
        from optuna.trial import TrialState

        storage, study_id = study._storage, study._study_id
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            if trial.state == TrialState.WAITING:
                study.ask()  # takes the oldest waiting trial: that one
            storage.set_trial_user_attr(trial_id, "error", "interrupted: the sweep stopped before the trial finished")
            study.tell(trial.number, state=TrialState.FAIL)
            tracker.close_child(
                trial.number, "KILLED", "interrupted: the sweep stopped before the trial finished", trial.params
            )
            log.info("trial %d was interrupted earlier: marked failed, it will run again", trial.number)

    @staticmethod
    def _retries(trials, names: List[str], done_keys: set) -> List[Dict[str, Any]]:  # noqa: UP006
        """Parameters of earlier failed trials that never succeeded, once each."""
        queue, seen = [], set(done_keys)
        for trial in trials:
            key = _cell_key(trial.params, names)
            if trial.state.name == "FAIL" and set(trial.params) == set(names) and key not in seen:
                queue.append(dict(trial.params))
                seen.add(key)
        return queue

    # -----------------------------------------------------------------------------------------
    def _run(self, study, dimensions, fixed, queue, grid: bool, tracker: "_ParentRun", state: "_SweepState"):

        distributions = {name: d.distribution for name, d in dimensions.items()}
        in_flight: Dict[concurrent.futures.Future, Any] = {}  # noqa: UP006
        previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.n_jobs, thread_name_prefix="trial")
        try:
            while True:
                while not state.stopping(len(in_flight)) and len(in_flight) < self.n_jobs:
                    if queue:
                        study.enqueue_trial(queue.pop(0))
                    elif grid:
                        break
                    trial = study.ask(distributions)
                    overrides = [
                        *fixed,
                        *(f"{name}={override_value(trial.params[name])}" for name in dimensions),
                        f"sweep.study_name={override_value(self.study_name)}",
                        f"sweep.storage={override_value(self.storage_spec)}",
                        f"sweep.trial={trial.number}",
                        f"sweep.parent_run_id={override_value(tracker.run_id)}",
                    ]
                    log.info(
                        "trial %d: %s", trial.number, " ".join(overrides[len(fixed) : len(fixed) + len(dimensions)])
                    )
                    in_flight[pool.submit(self._launch, overrides, trial.number)] = trial
                if not in_flight:
                    break
                finished, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    self._record(study, in_flight.pop(future), future, tracker, state)
        except KeyboardInterrupt:
            self._interrupt(study, in_flight, tracker, state)
            pool.shutdown(wait=True, cancel_futures=True)
            raise SweepError(
                f"sweep {self.study_name} interrupted: {state.done} of {state.target} trials finished, "
                f"{len(in_flight)} stopped; re-run the same command to resume"
            ) from None
        finally:
            signal.signal(signal.SIGTERM, previous_term)
        pool.shutdown(wait=True)

    def _launch(self, overrides: List[str], number: int):  # noqa: UP006
        return self.launcher.launch([overrides], initial_job_idx=number)[0]

    def _record(self, study, trial, future, tracker: "_ParentRun", state: "_SweepState") -> None:
        import optuna
        from optuna.trial import TrialState

        try:
            result = future.result()
        except Exception as error:  # the job died, or could not be submitted
            self._fail(study, trial, f"job died: {_whole(error)}", tracker, state)
            return
        if result.status == JobStatus.COMPLETED:
            values = result.return_value
            values = values if isinstance(values, list | tuple) else [values]
            numbers = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
            if len(numbers) != len(self.directions):
                self._fail(
                    study,
                    trial,
                    f"objective is {result.return_value!r}, not {len(self.directions)} finite number(s)",
                    tracker,
                    state,
                )
                return
            study.tell(trial, numbers)
            state.done += 1
            tracker.trial_ended(trial.number, "COMPLETE", numbers)
            log.info("trial %d: complete, %s", trial.number, " ".join(f"{v:.4f}" for v in numbers))
            return
        error = result._return_value
        if isinstance(error, optuna.TrialPruned):
            study.tell(trial, state=TrialState.PRUNED)
            state.done += 1
            tracker.trial_ended(trial.number, "PRUNED", None)
            log.info("trial %d: pruned (%s)", trial.number, error)
            return
        self._fail(study, trial, f"{type(error).__name__}: {_whole(error)}", tracker, state)

    def _fail(self, study, trial, message: str, tracker: "_ParentRun", state: "_SweepState") -> None:
        from optuna.trial import TrialState

        trial.set_user_attr("error", message[:4000])
        study.tell(trial, state=TrialState.FAIL)
        state.failures += 1
        state.errors.append(f"#{trial.number}: {message.splitlines()[0][:200]}")
        tracker.close_child(trial.number, "FAILED", message, trial.params)
        tracker.trial_ended(trial.number, "FAIL", None)
        log.warning("trial %d failed: %s", trial.number, message.splitlines()[0])

    def _interrupt(self, study, in_flight, tracker, state) -> None:
        from optuna.trial import TrialState

        from hydra_plugins.soda_launchers import inflight

        cancelled = inflight.cancel_all()
        log.warning("interrupted: cancelled %d job(s)", cancelled)
        for trial in in_flight.values():
            trial.set_user_attr("error", "interrupted: the sweep was stopped")
            study.tell(trial, state=TrialState.FAIL)
            tracker.close_child(trial.number, "KILLED", "interrupted: the sweep was stopped", trial.params)
        tracker.finish(study, state, status="KILLED")

    # -----------------------------------------------------------------------------------------
    def _summary(self, study, state: "_SweepState") -> str:
        counts: Dict[str, int] = {}  # noqa: UP006
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
        text = (
            f"sweep {self.study_name}: {len(trials)} trials in the study "
            f"({', '.join(f'{n} {s.lower()}' for s, n in sorted(counts.items()))}); this run: "
            f"{state.failures} failed"
        )
        if state.errors:
            text += f" [{'; '.join(state.errors[:5])}{'; ...' if len(state.errors) > 5 else ''}]"
        best = _best(study)
        if best:
            text += f"; best trial #{best.number}: {_values(best)} with {_params(best.params)}"
        return text

    def _write_results(self, study, summary: str) -> None:
        best = _best(study)
        results = {
            "study_name": self.study_name,
            "storage": redact(self.storage_spec),
            "summary": summary,
            "best_trial": best.number if best else None,
            "best_values": list(best.values) if best else None,
            "best_params": dict(best.params) if best else None,
        }
        path = Path(str(self.config.hydra.sweep.dir)) / "optuna_results.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), path)


@dataclass
class _SweepState:
    target: int
    done: int
    allowed_failures: int
    failures: int = 0
    errors: List[str] = field(default_factory=list)  # noqa: UP006

    def stopping(self, in_flight: int) -> bool:
        return self.failures > self.allowed_failures or self.done + in_flight >= self.target


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:500] if text else type(error).__name__


def _whole(error: BaseException) -> str:
    """The whole message (a dead job's includes the tail of its error stream), for the records."""
    text = str(error).strip()
    return text[:4000] if text else type(error).__name__


def _best(study):
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return None
    if len(study.directions) > 1:
        return study.best_trials[0] if study.best_trials else None
    return study.best_trial


def _values(trial) -> str:
    return ", ".join(f"{v:.4f}" for v in trial.values)


def _key(text: str) -> str:
    """An MLflow param/tag key: config groups' `@` is not allowed there."""
    return re.sub(r"[^\w\-. /]", "_", text)


def _params(params: Dict[str, Any]) -> str:  # noqa: UP006
    return " ".join(f"{k}={override_value(v)}" for k, v in params.items())


# ---------------------------------------------------------------------------------------------


class _ParentRun:
    """The sweep's MLflow run: its settings as params; one child run per trial (the trials tag
    themselves with `mlflow.parentRunId`); progress and the best trial as metrics and tags."""

    def __init__(self, config: DictConfig, study, sweeper: OptunaSweeper):
        import mlflow

        from soda.config import REPO_ROOT
        from soda.tracking import check_reachable, get_or_create_experiment, git_state

        tracking = config.tracking
        check_reachable(str(tracking.uri))
        self.client = mlflow.MlflowClient(str(tracking.uri))
        self.experiment_id = get_or_create_experiment(
            self.client, str(tracking.experiment), tracking.get("artifact_location")
        )
        self.study_name = sweeper.study_name
        previous = study.user_attrs.get(PARENT_ATTR)
        run = None
        if previous:
            try:
                run = self.client.get_run(previous)
            except Exception:
                run = None
        if run is not None:
            self.run_id = run.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "resumed", "true")
        else:
            tags = {"sweep": "parent", "optuna_study": self.study_name, **git_state(REPO_ROOT)}
            run = self.client.create_run(self.experiment_id, run_name=self.study_name, tags=tags)
            self.run_id = run.info.run_id
            params = {
                "sweep.study_name": self.study_name,
                "sweep.storage": redact(sweeper.storage_spec),
                "sweep.sampler": sweeper.sampler_conf["name"],
                "sweep.sampler_seed": str(sweeper.sampler_conf.get("seed")),
                "sweep.sampler_options": str(sweeper.sampler_conf.get("options") or {}),
                "sweep.pruner": sweeper.pruner_conf["name"],
                "sweep.pruner_options": str(sweeper.pruner_conf.get("options") or {}),
                "sweep.direction": ",".join(sweeper.directions),
                "sweep.n_trials": str(sweeper.n_trials),
                "sweep.n_jobs": str(sweeper.n_jobs),
                "sweep.max_failure_rate": str(sweeper.max_failure_rate),
                **{_key(f"sweep.params.{k}"): _spec_text(v) for k, v in sweeper.params.items()},
            }
            for key, value in params.items():
                self.client.log_param(self.run_id, key, value[:6000])
            base = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
            self.client.log_text(self.run_id, OmegaConf.to_yaml(base, resolve=True), "base_config.yaml")
            sweeper_conf = OmegaConf.to_container(config.hydra.sweeper, resolve=True)
            sweeper_conf["storage"] = redact(str(sweeper_conf.get("storage")))
            self.client.log_text(self.run_id, OmegaConf.to_yaml(sweeper_conf), "sweep.yaml")
            study.set_user_attr(PARENT_ATTR, self.run_id)

    def trial_ended(self, number: int, state: str, values) -> None:
        metrics = {f"trials_{state.lower()}": 1.0}
        if values:
            metrics.update({f"trial_value_{i}" if i else "trial_value": v for i, v in enumerate(values)})
        try:
            for key, value in metrics.items():
                self.client.log_metric(self.run_id, key, value, step=number)
        except Exception as error:  # the sweep goes on; the trial's own run holds its record
            log.warning("could not record trial %d in the parent MLflow run: %s", number, _first_line(error))

    def _child(self, number: int):
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.optuna_study = '{self.study_name}' and tags.trial = '{number}'",
            max_results=5,
        )
        return runs

    def close_child(self, number: int, status: str, error: str, params: Optional[Dict[str, Any]] = None) -> None:  # noqa: UP006, UP045
        """Mark the trial's own run ended (a job that died could not do it itself); a trial that
        failed before its run started gets a run here, so that every trial has one."""
        try:
            runs = self._child(number)
            if not runs:
                tags = {
                    "trial": str(number),
                    "optuna_study": self.study_name,
                    "mlflow.parentRunId": self.run_id,
                }
                run = self.client.create_run(
                    self.experiment_id, run_name=f"{self.study_name}-trial-{number}", tags=tags
                )
                for key, value in (params or {}).items():
                    self.client.log_param(run.info.run_id, _key(key), str(value))
                runs = [run]
            for run in runs:
                self.client.set_tag(run.info.run_id, "trial_state", "FAIL" if status == "FAILED" else status)
                if run.info.status == "RUNNING":
                    self.client.set_tag(run.info.run_id, "error", error[:5000])
                    self.client.set_terminated(run.info.run_id, status=status)
        except Exception as problem:
            log.warning("could not close the MLflow run of trial %d: %s", number, _first_line(problem))

    def finish(self, study, state: _SweepState, status: Optional[str] = None) -> None:  # noqa: UP045
        trials = study.get_trials(deepcopy=False)
        for name in ("COMPLETE", "PRUNED", "FAIL"):
            count = sum(t.state.name == name for t in trials)
            self.client.log_metric(self.run_id, f"study_{name.lower()}", float(count))
        best = _best(study)
        if best is not None:
            for i, value in enumerate(best.values):
                self.client.log_metric(self.run_id, "best_value" if i == 0 else f"best_value_{i}", value)
            self.client.set_tag(self.run_id, "best_trial", str(best.number))
            for key, value in best.params.items():
                self.client.set_tag(self.run_id, _key(f"best_params.{key}"), str(value))
        if status is None:
            status = "FAILED" if state.failures > state.allowed_failures else "FINISHED"
        self.client.set_terminated(self.run_id, status=status)
