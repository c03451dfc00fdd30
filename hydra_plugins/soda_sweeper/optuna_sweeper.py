"""An Optuna sweeper for Hydra (`hydra/sweeper=soda_optuna`), on current Optuna.

Optuna decides which trials run (ask), the configured launcher runs them (local processes or
SLURM jobs, `sweep.n_jobs` in flight at once, a new one as soon as one ends), and each trial's
returned objective is told back. A trial reports its probe accuracies while it trains (soda.sweep),
so a pruner can stop it early; a trial that raises or whose job dies is recorded as failed and the
sweep goes on until more than `max_failure_rate` of `n_trials` have failed. Running the same
command again with the same study name continues the study: finished trials are kept, interrupted
and failed ones are run again. MLflow gets one parent run per sweep, each trial a child run.
An Optuna storage that stops answering for `storage_timeout_s` ends the sweep with one line; its
parent run ends FAILED saying so, and the same command continues the study once it is back.

The `grid` sampler runs every combination of choice/range values once; the others sample
(`n_trials` required). `custom_search_space`, as in the published hydra-optuna-sweeper, names a
function `f(config, trial)` (config: the sweep's run config, `hydra` included) that may suggest
more parameters, each an override of that trial.

This module is the plugin class; the sweep itself is launching/sweeper/study_sweep.py.
"""

from typing import Any

from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig

from launching.sweeper.study_sweep import StudySweep


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any):
        # hydra.sweeper.* (hydra_plugins/soda_sweeper/config.py), as StudySweep takes them.
        self.study_sweep = StudySweep(**settings)
        self.launcher = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        # Our launchers (hydra_plugins/soda_launchers) agree to run trials: each job in its own
        # process, n_jobs launches in flight, and no line of their own on how each job ended.
        run_trials = getattr(self.launcher, "run_trials", None)
        if run_trials is not None:
            run_trials(self.study_sweep.n_jobs)
        self.study_sweep.attach(hydra_context, config, self._launch_one, jobs_apart=run_trials is not None)

    def sweep(self, arguments: list[str]) -> Any:
        return self.study_sweep.run(arguments)

    def _launch_one(self, overrides: list[str], number: int):
        return self.launcher.launch([overrides], initial_job_idx=number)[0]
