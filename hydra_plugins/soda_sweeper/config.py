"""The sweeper's settings (`hydra.sweeper.*`), as Hydra's config `soda_schema_sweeper_optuna`.

conf/hydra/sweeper/soda_optuna.yaml builds on this schema: its everyday settings (study name,
storage, trial count, trials in flight, failure rate) come from the run config's `sweep` node,
which holds their defaults, so they are MISSING here rather than a second default. A sweep file
(sweeps/) sets the rest: direction, sampler, pruner, params and custom_search_space.

The schema is stored outside every config group, as the run's `soda_schema` is: in a group it
would be one of the options Hydra offers (`hydra/sweeper=...`, --help), though nobody can sweep
with it alone.

`sampler` is untyped because it takes two forms (launching/sweeper/sampler.py): an
option of the group `hydra/sweeper/sampler` (`_target_` and the sampler's keyword arguments, as
in the published hydra-optuna-sweeper), or the older `{name, seed, options}`.

No `from __future__ import annotations` here: Hydra's plugin scan executes this module outside
sys.modules, and dataclasses cannot resolve string annotations then; OmegaConf also needs
typing's generics rather than `dict[...]` and `X | None`.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional  # OmegaConf needs typing's generics

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

SCHEMA = "soda_schema_sweeper_optuna"


@dataclass
class PrunerConf:
    name: str = "none"  # none | median | percentile | successive_halving | hyperband | threshold | patient | wilcoxon
    options: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of the pruner


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.soda_sweeper.optuna_sweeper.OptunaSweeper"
    # The sampler's node has a `_target_` too: the sweeper builds it (sampler.py), not Hydra.
    _recursive_: bool = False
    # From the run config's `sweep` node (conf/hydra/sweeper/soda_optuna.yaml); defaults live there.
    study_name: Optional[str] = MISSING  # null: a new name each time (no resume)
    storage: str = MISSING  # an Optuna journal file, or postgresql://... (soda/sweep.py)
    n_trials: Optional[int] = MISSING  # null: the whole grid
    n_jobs: int = MISSING  # trials in flight at once
    max_failure_rate: float = MISSING  # stop when more than this fraction of n_trials failed
    # From the sweep file.
    # maximize or minimize, or a list (one per objective). The published hydra-optuna-sweeper
    # defaults to minimize; ours to maximize, as the objectives here are accuracies (every sweep
    # file states its own).
    direction: Any = "maximize"
    sampler: Any = None  # hydra/sweeper/sampler=<name>, or {name, seed, options}; null: TPE, Optuna's defaults
    pruner: PrunerConf = field(default_factory=PrunerConf)
    params: Dict[str, Any] = field(default_factory=dict)  # config path -> Hydra sweep syntax
    # <module>.<function>(config, trial), called before each trial's overrides are built; what
    # it suggests (trial.suggest_*) becomes overrides too: parameters that depend on others.
    custom_search_space: Optional[str] = None
    # How long the Optuna storage may stop answering (PostgreSQL stopped, the journal's file system
    # gone) before the sweep ends with one line; each call is tried again until then. The trials
    # wait as long. A re-run continues the study once the storage is back.
    storage_timeout_s: float = 120.0  # soda.sweep.STORAGE_TIMEOUT_S
    # Continue a study with another sampler, sampler seed or arguments, pruner, or (for a seeded
    # sampler) sweep.n_jobs than it was run with: refused otherwise, as they change which trials it
    # runs. The sweep's MLflow run records each change in its tag resume_changes.
    resume_with_changes: bool = False


ConfigStore.instance().store(name=SCHEMA, node=OptunaSweeperConf, provider="soda")
