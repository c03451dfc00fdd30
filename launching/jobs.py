"""A launch's jobs: from a command line to each job's composition, and from a composition to the
settings the job will run with.

`job_settings` is the one way a composition becomes a job's settings; launch.py's checks, the
dry run, the launchers and the sweeper all go through it, so that what they refuse is what the
job itself (soda.train.run, which calls soda.config.to_settings) would refuse.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from soda.config import Config, to_settings


def without_hydra(composed: DictConfig) -> DictConfig:
    """The run's config: a composition without Hydra's own `hydra` node."""
    return OmegaConf.masked_copy(composed, [key for key in composed if key != "hydra"])


def job_settings(composed: DictConfig) -> Config:
    """A job's validated settings from its composition (Hydra's `hydra` node may be in it and is
    left out), as the job will read them; a bad value is a one-line ConfigError."""
    return to_settings(without_hydra(composed))
