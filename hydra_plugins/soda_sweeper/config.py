"""The sweeper's settings (`hydra.sweeper.*`), as Hydra's schema `hydra/sweeper/soda_optuna_base`.

conf/hydra/sweeper/optuna.yaml builds on this schema: its everyday settings (study name, storage,
trial count, trials in flight, failure rate) come from the run config's `sweep` node, which holds
their defaults, so they are MISSING here rather than a second default. A sweep file (sweeps/)
sets the rest: direction, sampler, pruner and params.

No `from __future__ import annotations` here: Hydra's plugin scan executes this module outside
sys.modules, and dataclasses cannot resolve string annotations then; OmegaConf also needs
typing's generics rather than `dict[...]` and `X | None`.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional  # OmegaConf needs typing's generics

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

SAMPLERS = ("grid", "tpe", "random", "cmaes", "nsga2", "qmc")


@dataclass
class SamplerConf:
    name: str = "tpe"  # grid | tpe | random | cmaes | nsga2 | qmc
    seed: Optional[int] = None
    options: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of the sampler


@dataclass
class PrunerConf:
    name: str = "none"  # none | median | percentile | successive_halving | hyperband | threshold | patient | wilcoxon
    options: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of the pruner


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.soda_sweeper.optuna_sweeper.OptunaSweeper"
    # From the run config's `sweep` node (conf/hydra/sweeper/optuna.yaml); defaults live there.
    study_name: Optional[str] = MISSING  # null: a new name each time (no resume)
    storage: str = MISSING  # an Optuna journal file, or postgresql://... (soda/sweep.py)
    n_trials: Optional[int] = MISSING  # null: the whole grid
    n_jobs: int = MISSING  # trials in flight at once
    max_failure_rate: float = MISSING  # stop when more than this fraction of n_trials failed
    # From the sweep file.
    direction: Any = "maximize"  # or a list, one per objective
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    params: Dict[str, Any] = field(default_factory=dict)  # config path -> Hydra sweep syntax


ConfigStore.instance().store(group="hydra/sweeper", name="soda_optuna_base", node=OptunaSweeperConf, provider="soda")
