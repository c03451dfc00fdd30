"""An Optuna study run as a Hydra sweep: what hydra_plugins/soda_sweeper's OptunaSweeper does
(see its docstring), given the sweeper's settings, the sweep's config and a launch function.
The pieces it wires together:

    sampler.py       the sampler from either form of its settings; the custom search space
    search_space.py  `params` and sweep overrides -> Optuna distributions, grid cells
    study.py         the Optuna study, created or continued
    parent_run.py    the sweep's MLflow run and its trials' runs when they cannot close their own
    scheduler.py     ask, launch, tell; failures, interrupts, resume
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from launching.jobs import job_settings, without_hydra
from launching.sweeper.parent_run import ParentRun
from launching.sweeper.sampler import SamplerSpec, custom_search_space, make_sampler, sampler_spec
from launching.sweeper.scheduler import Scheduler
from launching.sweeper.search_space import check_every_value, grid_cells, parse_space, spec_text
from launching.sweeper.study import (
    SETTINGS_ATTR,
    best_trial,
    check_sweep_settings,
    fixed_settings,
    open_study,
    sweep_settings,
)
from launching.sweeper.trials import SweepState, plan, recover, summary
from soda.errors import TrackingLost
from soda.store import quick_http_failures, redact
from soda.sweep import STORAGE_TIMEOUT_ATTR, STORAGE_TIMEOUT_S, StorageLost, SweepError, make_pruner, open_storage

log = logging.getLogger(__name__)

CUSTOM_SPACE_KEY = "(custom_search_space)"  # in the study's recorded space; no config path has parentheses


class StudySweep:
    """A sweep as hydra.sweeper.* sets it: attach() it to the sweep's config and a launch, then run() it."""

    def __init__(
        self,
        study_name: str | None,
        storage: str,
        direction: Any,
        n_trials: int | None,
        n_jobs: int,
        max_failure_rate: float,
        sampler: Any,
        pruner: Any,
        params: Any,
        custom_search_space: str | None = None,
        storage_timeout_s: float = STORAGE_TIMEOUT_S,
        resume_with_changes: bool = False,
    ):
        self.study_name = study_name or f"sweep-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        self.named = bool(study_name)
        self.storage_spec = str(storage)
        directions = [direction] if isinstance(direction, str) else list(direction)
        self.directions = [str(x).lower() for x in directions]
        self.n_trials = n_trials
        self.n_jobs = int(n_jobs)
        self.max_failure_rate = float(max_failure_rate)
        self.sampler_conf = _plain(sampler) if sampler is not None else None
        self.pruner_conf = _plain(pruner)
        self.params = _plain(params)
        self.custom_search_space = str(custom_search_space) if custom_search_space else None
        self.storage_timeout_s = float(storage_timeout_s)
        self.resume_with_changes = bool(resume_with_changes)
        self.config: DictConfig | None = None
        self.hydra_context = None
        self.launch_one: Callable | None = None
        self.jobs_apart = False

    def attach(self, hydra_context, config: DictConfig, launch_one: Callable, jobs_apart: bool) -> None:
        """`launch_one(overrides, number)`: the JobReturn of trial `number` once its job ended.
        `jobs_apart`: the launcher runs each job in a process of its own (it agreed to run trials:
        hydra_plugins/soda_launchers), as trials in flight together need."""
        self.hydra_context, self.config = hydra_context, config
        self.launch_one, self.jobs_apart = launch_one, jobs_apart

    def run(self, arguments: list[str]) -> Any:
        # While trials run, the scheduler handles Ctrl-C itself; before and after, say it in one line.
        try:
            return self._sweep(arguments)
        except KeyboardInterrupt:
            raise SweepError(f"sweep {self.study_name} interrupted; re-run the same command to resume") from None

    def _sweep(self, arguments: list[str]) -> Any:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        spec = sampler_spec(self.sampler_conf, self.config.hydra.runtime.choices.get("hydra/sweeper/sampler"))
        self._check_settings(spec.name, spec.grid)
        sampler = make_sampler(spec)
        custom_search_space(self.custom_search_space)  # fails now, before anything is stored

        # The search space, each of its values composed into a run config before anything is stored.
        dimensions, fixed = parse_space(self.params, arguments)
        if not dimensions:
            raise SweepError("the sweep has no parameters to vary: set hydra.sweeper.params in the sweep file")
        cells = grid_cells(dimensions) if spec.grid else None
        check_every_value(dimensions, fixed, self._compose)

        # The study and its MLflow run, continued when they exist; trials a killed sweep left
        # running are kept when their runs ended complete or pruned, else marked failed, to run again.
        storage = open_storage(self.storage_spec, timeout_s=self.storage_timeout_s)
        space = {name: d.spec for name, d in dimensions.items()}
        if self.custom_search_space:  # another function makes other trials: part of the space
            space[CUSTOM_SPACE_KEY] = self.custom_search_space
        run_config = OmegaConf.to_container(without_hydra(self.config), resolve=True)
        fixed_values = fixed_settings(run_config, dimensions)
        study = open_study(self.study_name, storage, self.directions, space, sampler, self.pruner_conf, fixed_values)
        settings = sweep_settings(spec, self.pruner_conf, self.n_jobs, self.n_trials, self.max_failure_rate)
        changes = check_sweep_settings(study, settings, self.resume_with_changes)
        parent = self._open_parent_run(study, spec)  # checks the tracking store before any job
        parent.record_changes(changes)
        study.set_user_attr(SETTINGS_ATTR, settings)  # once the change is on record
        study.set_user_attr(STORAGE_TIMEOUT_ATTR, self.storage_timeout_s)  # the trials' patience too
        try:
            return self._run(study, storage, parent, spec, dimensions, fixed, cells)
        except StorageLost as lost:
            parent.fail(str(lost))
            raise
        except TrackingLost as lost:
            with quick_http_failures(timeout=5):  # one quick try: the store was just found gone
                parent.fail(str(lost))
            raise

    def _run(self, study, storage, parent: ParentRun, spec: SamplerSpec, dimensions, fixed, cells) -> Any:
        """Recover what an earlier run left, run the rest, record the outcome."""
        recover(study, storage, parent)
        grid = spec.grid
        extend = custom_search_space(self.custom_search_space)

        # What is left to run, then run it.
        target, done, queue = plan(study.get_trials(deepcopy=False), list(dimensions), cells, self.n_trials)
        state = SweepState(target=target, done=done, allowed_failures=math.floor(self.max_failure_rate * target))
        log.info(
            "study %s (%s): %d of %d trials already finished; %s; storage %s",
            self.study_name,
            spec.name,
            done,
            target,
            f"{len(queue)} grid cells to run" if grid else f"{len(queue)} earlier trials to retry",
            redact(self.storage_spec),
        )
        if not self.named:
            log.info("no sweep.study_name: re-run with sweep.study_name=%s to resume this study", self.study_name)
        config = self.config
        scheduler = Scheduler(
            study,
            parent,
            self.launch_one,
            dimensions,
            fixed,
            self.storage_spec,
            self.n_jobs,
            extend=(lambda trial: extend(config, trial)) if extend else None,
        )
        scheduler.run(queue, grid, state)

        # The outcome: on MLflow, in the sweep folder, on the terminal.
        outcome = summary(study, state)
        failed = state.failures > state.allowed_failures
        parent.finish(study, status="FAILED" if failed else "FINISHED")
        self._write_results(study, outcome)
        print(outcome, flush=True)
        if failed:
            raise SweepError(
                f"{outcome}; stopped: more than max_failure_rate={self.max_failure_rate} of {target} trials failed"
            )
        return [(t.number, t.state.name, t.values) for t in study.get_trials(deepcopy=False)]

    def _check_settings(self, sampler: str, grid: bool) -> None:
        """Settings that cannot work fail here, before the study or any job exists."""
        bad = [x for x in self.directions if x not in ("maximize", "minimize")]
        if bad or not self.directions:
            raise SweepError(f"direction {bad or self.directions}: use maximize or minimize (one per objective)")
        objectives = self._objectives()
        if objectives and len(objectives) != len(self.directions):
            raise SweepError(
                f"{len(self.directions)} direction(s) {self.directions} for {len(objectives)} objective(s) "
                f"{objectives}: give one direction per objective"
            )
        if self.storage_timeout_s <= 0:
            raise SweepError(f"hydra.sweeper.storage_timeout_s={self.storage_timeout_s:g} must be positive")
        if not grid and self.n_trials is None:
            raise SweepError(f"sampler {sampler} needs sweep.n_trials (only a grid has an end)")
        # Trials in flight together must not share this process (Hydra's basic launcher runs a
        # job in the sweeper's own process and working directory).
        if self.n_jobs > 1 and not self.jobs_apart:
            raise SweepError(
                f"sweep.n_jobs={self.n_jobs} needs a launcher that runs jobs in their own processes: "
                "hydra/launcher=local or hydra/launcher=slurm"
            )
        make_pruner(self.pruner_conf["name"], self.pruner_conf.get("options"))  # fails early on a bad pruner

    def _objectives(self) -> list[str]:
        """The metric names of the config's `objective` (one or a list): each trial's values."""
        objective = self.config.get("objective")
        return [objective] if isinstance(objective, str) else [str(name) for name in objective or []]

    def _compose(self, overrides: list[str]) -> None:
        """Compose a trial's run config and check it with the run's schema (raises if invalid)."""
        job_settings(self.hydra_context.config_loader.load_sweep_config(self.config, overrides))

    def _open_parent_run(self, study, sampler: SamplerSpec) -> ParentRun:
        """The sweep's MLflow run, with the sweep's settings as params (no passwords)."""
        pruner = self.pruner_conf
        options = {key: value for key, value in sampler.kwargs.items() if key != "seed"}
        params = {
            "sweep.study_name": self.study_name,
            "sweep.storage": redact(self.storage_spec),
            "sweep.sampler": sampler.name,
            "sweep.sampler_class": sampler.target,
            "sweep.sampler_seed": str(sampler.kwargs.get("seed")),
            "sweep.sampler_options": str(options),
            "sweep.custom_search_space": str(self.custom_search_space),
            "sweep.pruner": pruner["name"],
            "sweep.pruner_options": str(pruner.get("options") or {}),
            "sweep.direction": ",".join(self.directions),
            "sweep.n_trials": str(self.n_trials),
            "sweep.n_jobs": str(self.n_jobs),
            "sweep.max_failure_rate": str(self.max_failure_rate),
            **{f"sweep.params.{k}": spec_text(v) for k, v in self.params.items()},
        }
        base = without_hydra(self.config)
        sweeper_conf = OmegaConf.to_container(self.config.hydra.sweeper, resolve=True)
        sweeper_conf["storage"] = redact(str(sweeper_conf.get("storage")))
        artifacts = {
            "base_config.yaml": OmegaConf.to_yaml(base, resolve=True),
            "sweep.yaml": OmegaConf.to_yaml(sweeper_conf),
        }
        tracking = self.config.tracking
        return ParentRun.open(
            str(tracking.uri),
            str(tracking.experiment),
            tracking.get("artifact_location"),
            study,
            params,
            artifacts,
            objectives=self._objectives(),
        )

    def _write_results(self, study, outcome: str) -> None:
        """optuna_results.yaml in the sweep folder: the best trial, beside the trials' folders."""
        best = best_trial(study)
        results = {
            "study_name": self.study_name,
            "storage": redact(self.storage_spec),
            "summary": outcome,
            "best_trial": best.number if best else None,
            "best_values": list(best.values) if best else None,
            "best_params": dict(best.params) if best else None,
        }
        path = Path(str(self.config.hydra.sweep.dir)) / "optuna_results.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), path)


def _plain(node: Any) -> dict:
    """A config node as a plain dict (resolved), as the modules below take their settings."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
