"""The run configuration: typed schemas for Hydra's config groups, validated before any work.

Hydra composes `conf/` on top of these schemas (registered as `soda_schema`), so a key that is
not here is an error and a value of the wrong type is an error. Ranges are checked when the
composed config is turned into these dataclasses (`to_settings`), which `soda.train.run` does
first thing; launching.jobs makes the same checks for a launch's command line without running it
(what `python launch.py ... --cfg job`, the dry run and the launchers' pre-check use). Hydra
appears here only as the composer of conf/ (its ConfigStore and compose); the launch side of
Hydra (command lines, sweeps, launchers) is launching/'s.

The values live in conf/, once: a field that a YAML file sets is MISSING ("???") here, so a
composition that lacks it is an error naming the key. The few fields no YAML file needs to set
(dataset.train_limit, ...) keep their one default here.
"""

from __future__ import annotations

import dataclasses
import difflib
import secrets
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional  # OmegaConf needs typing's generics

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from soda.config_groups import (
    DEVICES,
    AugmentationConfig,
    DatasetConfig,
    EvalConfig,
    ModelConfig,
    ScheduleConfig,
    SweepConfig,
    TrackingConfig,
    build_check,
    check_value,
)
from soda.data.shapes import FACTORS as SHAPE_FACTORS
from soda.errors import ConfigError, first_line
from soda.models.soda import check_soda_arguments
from soda.record import LATENT_GAP, OBJECTIVES, RECON_MSE, factor_metric
from soda.store import default_artifact_location, default_sweep_storage, default_tracking_uri

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

METRICS = OBJECTIVES


@dataclass
class Config:
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    augmentation: AugmentationConfig = MISSING
    schedule: ScheduleConfig = MISSING
    eval: EvalConfig = MISSING
    tracking: TrackingConfig = MISSING
    sweep: SweepConfig = MISSING
    seed: int = MISSING
    # Where the data sets are: dataset.root is <data_root>/<name> unless set itself.
    data_root: str = MISSING
    # The metric launch.py returns (what a sweeper optimises); a list for multi-objective sweeps.
    objective: Any = MISSING
    device: str = MISSING  # auto = cuda when available, else cpu
    peer_timeout_s: Optional[float] = MISSING  # a rank without a heartbeat this long ends the job (soda.heartbeat)
    # A rank that cannot reach rank 0's rendezvous this long ends the job (soda.dist).
    rendezvous_timeout_s: float = MISSING

    def model_arguments(self) -> dict[str, Any]:
        """soda.models.build_soda's arguments: the model node, plus what the data set decides."""
        model = {key: value for key, value in asdict(self.model).items() if key != "name"}
        data = self.dataset
        return {**model, "image_size": data.image_size, "input_mean": tuple(data.mean), "input_std": tuple(data.std)}

    def __post_init__(self):
        check_value(self.device in DEVICES, f"device={self.device!r}; allowed: {', '.join(DEVICES)}")
        check_value(
            self.peer_timeout_s is None or self.peer_timeout_s >= 2,
            f"peer_timeout_s={self.peer_timeout_s} must be at least 2 (seconds) or null",
        )
        check_value(
            self.rendezvous_timeout_s >= 1,
            f"rendezvous_timeout_s={self.rendezvous_timeout_s} must be at least 1 (seconds)",
        )
        names = [self.objective] if isinstance(self.objective, str) else list(self.objective or [])
        factors = [factor_metric(name) for name in SHAPE_FACTORS] if self.dataset.name == "shapes" else []
        check_value(
            bool(names) and all(name in METRICS or name in factors for name in names),
            f"objective={self.objective!r} must be one of {', '.join([*METRICS, *factors])}, or a list of them",
        )
        if not isinstance(self.objective, str):
            self.objective = names
        check_value(
            RECON_MSE not in names or self.eval.num_reconstructions > 0,
            f"objective {RECON_MSE} needs eval.num_reconstructions > 0",
        )
        check_value(
            LATENT_GAP not in names or self.eval.latent_gap_images > 0,
            f"objective {LATENT_GAP} needs eval.latent_gap_images > 0",
        )
        steps = self.model.timesteps
        check_value(
            all(0 <= t < steps for t in self.eval.latent_gap_timesteps),
            f"eval.latent_gap_timesteps={list(self.eval.latent_gap_timesteps)} must lie in 0..{steps - 1} "
            f"(model.timesteps={steps})",
        )
        self._check_what_the_run_builds()

    def _check_what_the_run_builds(self) -> None:
        """The checks the run makes when it builds the model and reads the data, made here so that a
        job is refused before it is launched, not after."""
        dataset_keys = {"image_size": "dataset.image_size", "input_mean": "dataset.mean", "input_std": "dataset.std"}
        build_check(
            check_soda_arguments, name=lambda key: dataset_keys.get(key, f"model.{key}"), **self.model_arguments()
        )
        steps, sample_steps = self.model.timesteps, self.eval.sample_steps
        check_value(
            self.eval.num_reconstructions == 0 or sample_steps <= steps,
            f"eval.sample_steps={sample_steps} must be at most model.timesteps={steps} (DDIM visits at most every "
            "timestep); lower it, or set eval.num_reconstructions=0",
        )
        train, test = self.dataset.known_size("train"), self.dataset.known_size("test")
        if train is not None:
            count, key = train
            batch = self.schedule.batch_size
            check_value(
                batch <= count,
                f"schedule.batch_size={batch} is larger than the training set ({key}={count} images); lower it",
            )
        if test is not None and self.eval.latent_gap_images > 0:
            count, key = test
            check_value(
                count >= 2,
                f"eval.latent_gap_images={self.eval.latent_gap_images} needs at least 2 test images but {key}={count}; "
                "raise it, or set eval.latent_gap_images=0",
            )


def register() -> None:
    """Make the schema known to Hydra (conf/config.yaml lists `soda_schema` first)."""
    ConfigStore.instance().store(name="soda_schema", node=Config)
    if not OmegaConf.has_resolver("soda_default"):
        # ${soda_default:tracking_uri}, ...: the default store locations, owned by soda.tracking.
        OmegaConf.register_new_resolver("soda_default", _store_default)
    if not OmegaConf.has_resolver("soda_launch"):
        # ${soda_launch:}: a short random name of this launch, so that two launches started in the
        # same second get different default run directories. Cached like Hydra's ${now:...}: a
        # multirun's jobs get the value their sweeper resolved.
        OmegaConf.register_new_resolver("soda_launch", lambda: secrets.token_hex(3), use_cache=True)


STORE_DEFAULTS = {
    "tracking_uri": default_tracking_uri,
    "artifact_location": default_artifact_location,
    "sweep_storage": default_sweep_storage,
}


def _store_default(name: str) -> str:
    if name not in STORE_DEFAULTS:
        raise ConfigError(f"soda_default:{name} is not known; allowed: {', '.join(STORE_DEFAULTS)}")
    return STORE_DEFAULTS[name]()


def schema_keys(schema: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every key of the schema by its dotted path (`schedule.epochs`), with its type."""
    keys: dict[str, Any] = {}
    for name, kind in typing.get_type_hints(schema).items():
        keys[prefix + name] = kind
        if dataclasses.is_dataclass(kind):
            keys.update(schema_keys(kind, f"{prefix}{name}."))
    return keys


def unknown_keys(cfg: DictConfig | dict) -> list[str]:
    """The keys of a composed config that the schema lacks, by dotted path. Hydra's `+key=value`
    and `++key=value` add a key even to a struct config, and the typed merge of `to_settings`
    would keep it unread; a key inside a free-form node (tracking.tags) is not unknown."""
    values = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
    known = schema_keys()
    found: list[str] = []

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if path not in known:
                found.append(path)
            elif dataclasses.is_dataclass(known[path]) and isinstance(value, dict):
                walk(value, f"{path}.")

    walk(values, "")
    return sorted(found)


def check_keys(cfg: DictConfig | dict) -> None:
    """A one-line ConfigError naming the keys the schema does not have (and the closest known key)."""
    unknown = unknown_keys(cfg)
    if not unknown:
        return
    known = list(schema_keys())
    if len(unknown) > 1:
        raise ConfigError(f"{', '.join(unknown)} are not config keys (the schema is soda/config.py)")
    key = unknown[0]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
    if not close:  # `epochs` for `schedule.epochs`: the same last part under another node
        leaf = key.rsplit(".", 1)[-1]
        leaves = {path.rsplit(".", 1)[-1]: path for path in reversed(known)}
        close = [leaves[name] for name in difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.8)]
    hint = f"did you mean {close[0]}?" if close else "the schema is soda/config.py"
    raise ConfigError(f"{key} is not a config key; {hint}")


def to_settings(cfg: DictConfig) -> Config:
    """Validated dataclasses from a composed config; a bad value is a one-line ConfigError."""
    try:
        check_keys(cfg)
        schema = OmegaConf.structured(Config)
        merged = OmegaConf.merge(schema, cfg)
        missing = sorted(OmegaConf.missing_keys(merged))
        check_value(
            not missing, f"no value for {', '.join(missing)}: give one in conf/ or as key=value on the command line"
        )
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except Exception as error:  # OmegaConf's validation errors are multi-line; keep the first line
        raise ConfigError(first_line(error, limit=1000)) from error


def run_directory() -> Path:
    """The run directory Hydra chose for the running job (hydra.run.dir, or a sweep's subdir)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def compose(overrides: Sequence[str] = ()) -> Config:
    """The validated settings of conf/ with command-line style overrides (`model=tiny`,
    `model.layer_groups=2`), for tools that run outside launch.py (soda.models.summary)."""
    return to_settings(compose_config(overrides))


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The composed (unvalidated) config of conf/ with command-line style overrides; a Hydra
    error is a one-line ConfigError."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        composed = compose_raw(overrides, with_hydra=False)
    except (HydraException, OmegaConfBaseException) as error:
        cause = f": {first_line(error.__cause__)}" if error.__cause__ else ""  # e.g. which key is unknown
        raise ConfigError(first_line(error, limit=1000).rstrip(".") + cause) from error
    check_keys(composed)
    return composed


def compose_raw(
    overrides: Sequence[str], config_name: str = "config", config_dir: Path = CONF_DIR, with_hydra: bool = True
) -> DictConfig:
    """The composition launch.py's Hydra would make, with or without Hydra's own `hydra` node;
    unvalidated, and Hydra's errors as they are (launching.jobs composes a launch's jobs with it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=with_hydra)


# A run is GPU-sized when it trains a model at least this wide (the reference's UNet has 128
# channels, the demo's 16) for at least this many epochs: days on CPUs, hours on a GPU.
GPU_SIZED_CHANNELS = 64
GPU_SIZED_EPOCHS = 50


def gpu_sized(settings: Any) -> str | None:
    """What makes a run (a soda.config.Config) one for GPUs, as a phrase (`model soda_r18_ddpm,
    800 epochs of cifar10 at batch 512`), or None for a run CPUs can finish."""
    model, schedule = settings.model, settings.schedule
    budget = schedule.train_seconds
    if model.base_channels < GPU_SIZED_CHANNELS or schedule.epochs < GPU_SIZED_EPOCHS:
        return None
    if budget is not None and budget <= 3600:
        return None
    return (
        f"model {model.name} ({model.base_channels} channels), {schedule.epochs} epochs of "
        f"{settings.dataset.name} at batch {schedule.batch_size}"
    )


register()
