"""The launch side: everything between a command line and a run of `soda.train`.

`launch.py` calls `launching.cli.main` once. This package composes a job's settings (jobs.py),
reads the site profile (site.py, `make site`: site_init.py), checks a launch before anything runs
and shows it (dryrun.py, slurm.py), submits and watches jobs (the launchers' logic) and drives
Optuna studies (sweeper/). It imports `soda`; `soda` never imports it, nor `hydra_plugins`, whose
modules are thin Hydra plugin classes over this package. See docs/architecture.md.
"""
