"""The sweeper's configuration without jobs: the sampler group and the older sampler form, the
custom search space's name, the shipped sweep files, the schema kept out of Hydra's options, and
living beside the published hydra-optuna-sweeper."""

from __future__ import annotations

import copy
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import MISSING, OmegaConf

from launching.sweeper.sampler import GRID, custom_search_space, make_sampler, sampler_spec
from soda.sweep import SweepError
from tests.helpers import CONF

# What Hydra's plugin scan registers, registered before any test copies the ConfigStore.
for _module in ("hydra_plugins.soda_sweeper.config", "hydra_plugins.soda_launchers.launchers"):
    importlib.import_module(_module)

SAMPLER_FILES = sorted(p.stem for p in (CONF / "hydra" / "sweeper" / "sampler").glob("*.yaml"))


def _compose(overrides: list[str]):
    """The run config with its `hydra` node, as the sweeper gets it (-m)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def _sampler(overrides: list[str]):
    """(the sampler spec, the sampler) that `overrides` compose to."""
    cfg = _compose(overrides)
    node = OmegaConf.to_container(cfg.hydra.sweeper.sampler, resolve=True)
    spec = sampler_spec(node, cfg.hydra.runtime.choices.get("hydra/sweeper/sampler"))
    return spec, make_sampler(spec)


# ---------------------------------------------------------------------------------------------
# The sampler group


def test_the_group_offers_every_sampler_with_optuna_s_own_defaults():
    assert SAMPLER_FILES == ["cmaes", "gp", "grid", "nsgaii", "nsgaiii", "qmc", "random", "tpe"]
    for name in SAMPLER_FILES:
        node = OmegaConf.to_container(OmegaConf.load(CONF / "hydra" / "sweeper" / "sampler" / f"{name}.yaml"))
        target = node.pop("_target_")
        assert target.startswith("optuna.samplers."), name
        node.pop("_partial_", None)
        parameters = inspect.signature(getattr(optuna.samplers, target.rsplit(".", 1)[-1])).parameters
        for key, value in node.items():
            assert key in parameters, f"{name}: {key} is not an argument of {target}"
            assert value == parameters[key].default, (
                f"{name}: {key}={value!r}, Optuna's default {parameters[key].default!r}"
            )


def test_a_sampler_is_picked_and_set_on_the_command_line():
    base = ["sweep=augment_ablation"]
    spec, sampler = _sampler([*base, "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=5"])
    assert (spec.name, spec.target, spec.kwargs) == ("random", "optuna.samplers.RandomSampler", {"seed": 5})
    assert isinstance(sampler, optuna.samplers.RandomSampler)

    spec, sampler = _sampler([*base, "hydra/sweeper/sampler=qmc", "hydra.sweeper.sampler.qmc_type=halton"])
    assert isinstance(sampler, optuna.samplers.QMCSampler) and sampler._qmc_type == "halton"

    with pytest.raises(ConfigCompositionException, match="n_startup_trialz"):  # a typo is an error
        _compose(["sweep=lr_search", "hydra.sweeper.sampler.n_startup_trialz=4"])

    # lr_search sets TPE's arguments: another sampler picked over it says which one it does not take.
    with pytest.raises(SweepError, match=r"^sampler random \(optuna.samplers.RandomSampler\): .*'n_startup_trials'$"):
        _sampler(["sweep=lr_search", "hydra/sweeper/sampler=random"])


def test_the_shipped_sweeps_keep_their_samplers():
    spec, sampler = _sampler(["sweep=lr_search"])
    assert spec.name == "tpe" and isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._n_startup_trials == 4 and spec.kwargs["seed"] == 0
    assert sampler._multivariate is None  # Optuna's own choice, not the published plugin's false
    cfg = _compose(["sweep=lr_search"])
    assert cfg.hydra.sweeper.pruner.name == "median"
    assert OmegaConf.to_container(cfg.hydra.sweeper.pruner.options) == {"n_startup_trials": 2, "n_warmup_steps": 1}
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.soda_sweeper.optuna_sweeper.OptunaSweeper"

    spec, sampler = _sampler(["sweep=augment_ablation"])
    assert spec.name == "grid" and spec.grid and spec.target == GRID
    assert isinstance(sampler, optuna.samplers.RandomSampler)  # fills in only what a custom space adds


def test_tpe_seeded_twice_samples_the_same_points():
    def points(seed):
        spec, sampler = _sampler(["sweep=lr_search", f"hydra.sweeper.sampler.seed={seed}"])
        study = optuna.create_study(sampler=sampler, direction="maximize")
        study.optimize(lambda t: -((t.suggest_float("x", -2, 2) - 1) ** 2), n_trials=6)
        return [t.params["x"] for t in study.trials]

    assert points(0) == points(0) and points(0) != points(1)


# ---------------------------------------------------------------------------------------------
# The older form, and what cannot work


def test_the_older_form_still_works():
    assert sampler_spec(None, None).target == "optuna.samplers.TPESampler"
    spec = sampler_spec({"name": "tpe", "seed": 0, "options": {"n_startup_trials": 4}}, None)
    assert (spec.name, spec.kwargs) == ("tpe", {"seed": 0, "n_startup_trials": 4})
    assert make_sampler(spec)._n_startup_trials == 4
    assert sampler_spec({"name": "nsga2"}, None).target == "optuna.samplers.NSGAIISampler"
    assert sampler_spec({"name": "grid", "seed": 1}, None).grid


def test_the_older_form_composes_from_a_sweep_file(tmp_path):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "old.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /hydra/sweeper: soda_optuna\n"
        "hydra:\n  sweeper:\n    sampler: {name: tpe, seed: 0, options: {n_startup_trials: 4}}\n"
    )
    spec, sampler = _sampler(["sweep=old", f"hydra.searchpath=[file://{tmp_path}]"])
    assert spec.name == "tpe" and sampler._n_startup_trials == 4

    # The group picked on top of it: the two forms mixed, in one line.
    with pytest.raises(SweepError) as mixed:
        _sampler(["sweep=old", f"hydra.searchpath=[file://{tmp_path}]", "hydra/sweeper/sampler=tpe"])
    assert str(mixed.value).startswith(
        "hydra.sweeper.sampler mixes the group form (hydra/sweeper/sampler=tpe) with the older form's name, options"
    )
    assert "\n" not in str(mixed.value)


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"name": "tpee"}, "sampler 'tpee' is not known; allowed: grid, tpe, random, cmaes, nsga2, qmc"),
        ({"name": "tpe", "n_startup_trials": 4}, "hydra.sweeper.sampler has n_startup_trials, which the form"),
        ({"_target_": "optuna.samplers.TPESampler", "options": {}}, "mixes the group form (_target_)"),
        ({"_target_": "optuna.samplers.TPESampler", "n_startup_trial": 4}, "sampler TPESampler"),
        ({"_target_": "optuna.samplers.NoSuchSampler"}, "sampler NoSuchSampler (optuna.samplers.NoSuchSampler)"),
        ({"_target_": "optuna.pruners.MedianPruner"}, "optuna.pruners.MedianPruner is not an Optuna sampler"),
        ("tpe", "hydra.sweeper.sampler='tpe': use hydra/sweeper/sampler=<option>"),
    ],
)
def test_a_sampler_that_cannot_work_is_one_line(node, message):
    with pytest.raises(SweepError) as raised:
        make_sampler(sampler_spec(node, None))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_custom_search_space_is_found_or_refused_in_one_line():
    assert custom_search_space(None) is None
    assert custom_search_space("os.path.join") is __import__("os").path.join
    for path, why in [
        ("no_such_module_xyz.configure", "no_such_module_xyz"),
        ("os.path.no_such_function", "no_such_function"),
        ("configure", "configure"),
    ]:
        with pytest.raises(SweepError) as raised:
            custom_search_space(path)
        text = str(raised.value)
        assert text.startswith(f"hydra.sweeper.custom_search_space={path}: ") and why in text, text
        assert "\n" not in text and text.endswith("(give <module>.<function>, importable from where you launch)")


# ---------------------------------------------------------------------------------------------
# What Hydra offers


def test_the_sweeper_s_schema_is_not_an_option_of_hydra_sweeper():
    with pytest.raises(ConfigCompositionException) as raised:
        _compose(["hydra/sweeper=nope"])
    listed = str(raised.value).split("Available options in 'hydra/sweeper':")[1].split("Config search path")[0]
    assert listed.split() == ["basic", "soda_optuna"]
    cfg = _compose(["hydra/sweeper=soda_optuna"])  # the schema still types it
    with pytest.raises(ConfigCompositionException, match="n_trialz"):
        _compose(["hydra/sweeper=soda_optuna", "hydra.sweeper.n_trialz=3"])
    assert cfg.hydra.sweeper.custom_search_space is None and cfg.hydra.sweeper.sampler is None


# ---------------------------------------------------------------------------------------------
# Beside the published hydra-optuna-sweeper (which cannot be installed here): nodes shaped like
# the ones it registers in Hydra's ConfigStore, with their names, groups, fields and types.


@dataclass
class _PublishedSampler:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None


@dataclass
class _PublishedGrid:
    _target_: str = "optuna.samplers.GridSampler"
    _partial_: bool = True


@dataclass
class _PublishedTPE:
    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None
    consider_prior: bool | None = None
    prior_weight: float | None = None
    consider_magic_clip: bool | None = None
    consider_endpoints: bool | None = None
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    multivariate: bool = False
    warn_independent_sampling: bool | None = None


@dataclass
class _PublishedCmaEs:
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: int | None = None
    x0: dict | None = None
    sigma0: float | None = None
    independent_sampler: Any | None = None
    warn_independent_sampling: bool = True
    consider_pruned_trials: bool = False
    restart_strategy: Any | None = None
    inc_popsize: int = 2
    use_separable_cma: bool = False
    source_trials: Any | None = None


@dataclass
class _PublishedNSGAII:
    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: int | None = None
    population_size: int = 50
    mutation_prob: float | None = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5
    constraints_func: Any | None = None


@dataclass
class _PublishedGP:
    _target_: str = "optuna.samplers.GPSampler"
    seed: int | None = None
    independent_sampler: Any | None = None
    n_startup_trials: int = 10
    deterministic_objective: bool = False
    constraints_func: Any | None = None
    warn_independent_sampling: bool = True


@dataclass
class _PublishedQMC:
    _target_: str = "optuna.samplers.QMCSampler"
    seed: int | None = None
    qmc_type: str = "sobol"
    scramble: bool = False
    independent_sampler: Any | None = None
    warn_asynchronous_seeding: bool = True
    warn_independent_sampling: bool = True


@dataclass
class _PublishedMOTPE:
    _target_: str = "hydra_plugins.hydra_optuna_sweeper.config.raise_motpe_removed"


@dataclass
class _PublishedSweeper:
    _target_: str = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    defaults: list = field(default_factory=lambda: [{"sampler": "tpe"}])
    sampler: Any = MISSING
    direction: Any = "minimize"
    storage: Any | None = None
    study_name: str | None = None
    n_trials: int = 20
    n_jobs: int = 2
    max_failure_rate: float = 0.0
    params: dict | None = None
    custom_search_space: str | None = None


@pytest.fixture
def published_plugin(monkeypatch):
    """The published plugin's ConfigStore nodes, for this test only."""
    store = ConfigStore.instance()
    monkeypatch.setattr(store, "repo", copy.deepcopy(store.repo))
    store.store(group="hydra/sweeper", name="optuna", node=_PublishedSweeper, provider="optuna_sweeper")
    samplers = {
        "tpe": _PublishedTPE,
        "random": _PublishedSampler,
        "cmaes": _PublishedCmaEs,
        "nsgaii": _PublishedNSGAII,
        "motpe": _PublishedMOTPE,
        "grid": _PublishedGrid,
        "gp": _PublishedGP,
        "qmc": _PublishedQMC,
    }
    for name, node in samplers.items():
        store.store(group="hydra/sweeper/sampler", name=name, node=node, provider="optuna_sweeper")


@pytest.mark.filterwarnings("ignore:\\s*'hydra/sweeper/sampler/:UserWarning")
def test_our_sweeps_and_the_published_sweeper_both_compose_when_it_is_installed(published_plugin):
    ours = "hydra_plugins.soda_sweeper.optuna_sweeper.OptunaSweeper"
    # Our sweep files stay on our sweeper, with their samplers' settings.
    spec, sampler = _sampler(["sweep=lr_search"])
    assert _compose(["sweep=lr_search"]).hydra.sweeper._target_ == ours
    assert spec.name == "tpe" and spec.kwargs["seed"] == 0 and sampler._n_startup_trials == 4
    assert spec.kwargs["multivariate"] is False  # the published node fills in what our file leaves out
    spec, _ = _sampler(["sweep=augment_ablation"])
    assert spec.grid and _compose(["sweep=augment_ablation"]).hydra.sweeper._target_ == ours
    # Every option of the shared group composes under our sweeper.
    for name in SAMPLER_FILES:
        cfg = _compose(["sweep=augment_ablation", f"hydra/sweeper/sampler={name}"])
        assert cfg.hydra.sweeper._target_ == ours
        assert cfg.hydra.sweeper.sampler._target_.startswith("optuna.samplers."), name

    # `hydra/sweeper=optuna` is the published sweeper, with its own default sampler.
    theirs = _compose(["hydra/sweeper=optuna"])
    assert theirs.hydra.sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert theirs.hydra.sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert theirs.hydra.sweeper.n_trials == 20 and "max_failure_rate" in theirs.hydra.sweeper
    assert _compose(["hydra/sweeper=optuna", "hydra/sweeper/sampler=motpe"]).hydra.sweeper.sampler._target_.endswith(
        "raise_motpe_removed"
    )
