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
import re
import secrets
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional  # OmegaConf needs typing's generics

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from soda import tracking
from soda.data import shapes
from soda.data.shapes import FACTORS as SHAPE_FACTORS
from soda.errors import ConfigError, first_line
from soda.models.soda import check_soda_arguments

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
PRECISIONS = ("fp32", "fp16", "bf16")
# torch.compile modes for the training loss; auto = "default" on CUDA, eager elsewhere.
COMPILE_MODES = ("auto", "none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# dataset.name: cifar10, cifar100, tiny_imagenet and shapes have loaders of their own; any other
# name (imagefolder, or one of your own) is read as an image folder. The name is part of the
# cache's file names, so it must be a plain word.
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
DEVICES = ("auto", "cpu", "cuda")
LINEAR_PROBE_WHEN = ("every", "last")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _build_check(check: Callable[..., None], *args, **kwargs) -> None:
    """One of the checks the run's model or data makes when it is built (a pure function raising
    ValueError: soda.models.check_soda_arguments, ...), made here as a one-line ConfigError, so
    that `--cfg job`, the dry run and the launchers' pre-check refuse what the run would."""
    try:
        check(*args, **kwargs)
    except ValueError as error:
        raise ConfigError(str(error)) from None


@dataclass
class ModelConfig:
    name: str = MISSING
    arch: str = MISSING
    latent_dim: int = MISSING
    small_images: bool = MISSING
    base_channels: int = MISSING
    channel_mults: List[int] = MISSING
    attention_levels: List[bool] = MISSING
    blocks_per_level: int = MISSING
    attention_heads: int = MISSING
    dropout: float = MISSING
    norm_groups: int = MISSING
    layer_groups: int = MISSING
    layer_mask_prob: float = MISSING
    latent_drop_prob: float = MISSING
    source_noise_std: float = MISSING
    noise_schedule: str = MISSING
    timesteps: int = MISSING
    beta_start: float = MISSING
    beta_end: float = MISSING
    # The model is built from these fields under these names: build_soda(**Config.model_arguments()).
    # Config checks them with build_soda's own checks (check_soda_arguments), before any launch.


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: str = MISSING
    image_size: int = MISSING
    num_classes: int = MISSING
    mean: List[float] = MISSING
    std: List[float] = MISSING
    download: bool = MISSING  # torchvision download when the files are missing (needs network)
    train_limit: Optional[int] = None  # use only the first N training images (quick runs)
    test_limit: Optional[int] = None
    train_size: int = 0  # shapes only: how many images to generate
    test_size: int = 0  # shapes only

    def __post_init__(self):
        _check(
            DATASET_NAME.fullmatch(self.name) is not None,
            f"dataset.name={self.name!r} must start with a letter or digit and hold only letters, digits, _ "
            "and - (it names the cache files)",
        )
        _check(self.image_size >= 8, f"dataset.image_size={self.image_size} must be at least 8")
        _check(self.num_classes >= 2, f"dataset.num_classes={self.num_classes} must be at least 2")
        _check(len(self.mean) == 3 and len(self.std) == 3, "dataset.mean and dataset.std need 3 values (RGB)")
        _check(all(s > 0 for s in self.std), f"dataset.std={list(self.std)} must be positive")
        for key in ("train_limit", "test_limit"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"dataset.{key}={value} must be null or a positive count")
        if self.name == "shapes":
            _check(self.train_size >= 1 and self.test_size >= 1, "dataset.train_size and test_size must be positive")
            _build_check(shapes.check_class_count, self.num_classes, name=lambda key: f"dataset.{key}")

    def known_size(self, split: str) -> tuple[int, str] | None:
        """How many images a split will hold and the key that says so, where the config alone tells
        (shapes' sizes, a limit); None when only the data can tell."""
        known = [(getattr(self, f"{split}_limit"), f"dataset.{split}_limit")]
        if self.name == "shapes":
            known.append((getattr(self, f"{split}_size"), f"dataset.{split}_size"))
        known = [(count, key) for count, key in known if count is not None]
        return min(known) if known else None


@dataclass
class ViewConfig:
    """One view's augmentation, in the reference's order: with probability `crop_prob` a random
    resized crop followed by a horizontal flip (p = flip_prob); then with probability
    `randaugment_prob` RandAugment. A view with everything at 0 is the image as stored."""

    name: str = MISSING  # the option of conf/augmentation/view/ it came from (for tables)
    crop_prob: float = MISSING
    crop_scale: List[float] = MISSING
    crop_ratio: List[float] = MISSING
    flip_prob: float = MISSING
    randaugment_prob: float = MISSING
    randaugment_ops: int = MISSING
    randaugment_magnitude: int = MISSING

    def validate(self, where: str) -> None:
        for key in ("crop_prob", "flip_prob", "randaugment_prob"):
            value = getattr(self, key)
            _check(0.0 <= value <= 1.0, f"{where}.{key}={value} must be a probability in [0, 1]")
        low, high = self.crop_scale
        _check(0 < low <= high <= 1, f"{where}.crop_scale={list(self.crop_scale)} must satisfy 0 < min <= max <= 1")
        low, high = self.crop_ratio
        _check(0 < low <= high, f"{where}.crop_ratio={list(self.crop_ratio)} must satisfy 0 < min <= max")
        _check(self.randaugment_ops >= 0, f"{where}.randaugment_ops must be >= 0")
        _check(0 <= self.randaugment_magnitude <= 30, f"{where}.randaugment_magnitude must be in [0, 30]")


@dataclass
class AugmentationConfig:
    name: str = MISSING
    source: ViewConfig = MISSING
    target: ViewConfig = MISSING

    def __post_init__(self):
        self.source.validate("augmentation.source")
        self.target.validate("augmentation.target")


@dataclass
class ScheduleConfig:
    name: str = MISSING
    epochs: int = MISSING
    warmup_epochs: float = MISSING
    batch_size: int = MISSING  # global batch (all ranks together)
    decoder_lr: float = MISSING  # already scaled for the global batch; nothing multiplies it later
    encoder_lr_ratio: float = MISSING  # encoder lr = decoder_lr * encoder_lr_ratio
    weight_decay: float = MISSING
    adam_betas: List[float] = MISSING
    grad_clip: Optional[float] = MISSING  # max gradient norm; null = no clipping
    ema_decay: float = MISSING
    ema_update_every: int = MISSING
    ema_warmup_power: float = MISSING  # ema-pytorch's warm-up: decay = 1 - (1 + step) ** -power, capped
    precision: str = MISSING  # the seed used fp16; bf16 needs no loss scaler (and its host syncs)
    compile: str = MISSING  # torch.compile mode of the loss: auto (compile on CUDA), none, or a mode
    channels_last: Optional[bool] = MISSING  # NHWC weights and views; null = on a CPU only
    checkpoint_every: int = MISSING  # epochs; a checkpoint is also written at the end
    log_every: int = MISSING  # optimiser steps between train/loss points
    # Stop training after this many seconds, counted from the end of the first optimiser step (so
    # compilation is not in it) and without the evaluations; then evaluate and finish. null = off.
    train_seconds: Optional[float] = MISSING

    def __post_init__(self):
        _check(self.epochs >= 1, f"schedule.epochs={self.epochs} must be at least 1")
        _check(self.warmup_epochs >= 0, f"schedule.warmup_epochs={self.warmup_epochs} must be >= 0")
        _check(self.batch_size >= 2, f"schedule.batch_size={self.batch_size} must be at least 2")
        _check(self.decoder_lr > 0, f"schedule.decoder_lr={self.decoder_lr} must be positive")
        _check(self.encoder_lr_ratio > 0, f"schedule.encoder_lr_ratio={self.encoder_lr_ratio} must be positive")
        _check(self.weight_decay >= 0, f"schedule.weight_decay={self.weight_decay} must be >= 0")
        _check(
            len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
            f"schedule.adam_betas={list(self.adam_betas)} must be two values in [0, 1)",
        )
        _check(
            self.grad_clip is None or self.grad_clip > 0,
            f"schedule.grad_clip={self.grad_clip} must be positive or null",
        )
        _check(0 <= self.ema_decay < 1, f"schedule.ema_decay={self.ema_decay} must be in [0, 1)")
        _check(self.ema_update_every >= 1, f"schedule.ema_update_every={self.ema_update_every} must be >= 1")
        _check(self.precision in PRECISIONS, f"schedule.precision={self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        _check(self.compile in COMPILE_MODES, f"schedule.compile={self.compile!r}; allowed: {', '.join(COMPILE_MODES)}")
        _check(self.checkpoint_every >= 1, f"schedule.checkpoint_every={self.checkpoint_every} must be >= 1")
        _check(self.log_every >= 1, f"schedule.log_every={self.log_every} must be >= 1")
        _check(
            self.train_seconds is None or self.train_seconds > 0,
            f"schedule.train_seconds={self.train_seconds} must be positive or null",
        )


@dataclass
class EvalConfig:
    name: str = MISSING
    every: int = MISSING  # epochs between probe evaluations; the last epoch is always evaluated
    # Also evaluate at the end of an epoch once this many seconds of training passed since the last
    # evaluation (for time-boxed runs, see schedule.train_seconds). null = by epochs only.
    every_seconds: Optional[float] = MISSING
    at_start: bool = MISSING  # also evaluate the untrained encoder (epoch 0), a baseline
    linear_probe: str = MISSING  # every: at each evaluation; last: only at the final one (k-NN always)
    batch_size: int = MISSING  # feature extraction batch
    knn_k: int = MISSING
    knn_vote: str = MISSING  # uniform (the reference) | weighted (DINO)
    knn_temperature: float = MISSING
    probe_epochs: int = MISSING
    probe_lr: float = MISSING
    probe_batch_size: int = MISSING
    probe_augmented_copies: int = MISSING  # extra augmented passes over the training set for the probe
    probe_augmentation: ViewConfig = MISSING  # the view the probe trains on (with probe_augmented_copies)
    num_reconstructions: int = MISSING  # test images reconstructed into the grid at each eval (0 = none)
    sample_steps: int = MISSING
    sample_eta: float = MISSING
    guidance: float = MISSING
    # eval/latent_gap: how much worse the decoder predicts noise with another image's latent than
    # with its own, on the first latent_gap_images test images (0 = off) at these timesteps.
    latent_gap_images: int = MISSING
    latent_gap_timesteps: List[int] = MISSING

    def __post_init__(self):
        _check(self.every >= 1, f"eval.every={self.every} must be at least 1")
        _check(
            self.every_seconds is None or self.every_seconds > 0,
            f"eval.every_seconds={self.every_seconds} must be positive or null",
        )
        _check(
            self.linear_probe in LINEAR_PROBE_WHEN,
            f"eval.linear_probe={self.linear_probe!r}; allowed: {', '.join(LINEAR_PROBE_WHEN)}",
        )
        _check(
            self.latent_gap_images == 0 or self.latent_gap_images >= 2,
            f"eval.latent_gap_images={self.latent_gap_images} must be 0 to turn it off, or at least 2",
        )
        _check(bool(self.latent_gap_timesteps), "eval.latent_gap_timesteps needs at least one timestep")
        _check(self.batch_size >= 1, f"eval.batch_size={self.batch_size} must be positive")
        _check(self.knn_k >= 1, f"eval.knn_k={self.knn_k} must be positive")
        _check(self.knn_vote in ("uniform", "weighted"), f"eval.knn_vote={self.knn_vote!r}; allowed: uniform, weighted")
        _check(self.knn_temperature > 0, f"eval.knn_temperature={self.knn_temperature} must be positive")
        _check(
            self.probe_epochs >= 1 and self.probe_lr > 0 and self.probe_batch_size >= 2,
            "eval.probe_epochs >= 1, eval.probe_lr > 0 and eval.probe_batch_size >= 2 are required",
        )
        _check(self.probe_augmented_copies >= 0, "eval.probe_augmented_copies must be >= 0")
        self.probe_augmentation.validate("eval.probe_augmentation")
        _check(self.num_reconstructions >= 0, "eval.num_reconstructions must be >= 0")
        _check(self.sample_steps >= 1, f"eval.sample_steps={self.sample_steps} must be at least 1")
        _check(self.sample_eta >= 0 and self.guidance >= 0, "eval.sample_eta and eval.guidance must be >= 0")


@dataclass
class TrackingConfig:
    name: str = MISSING
    uri: str = MISSING
    experiment: str = MISSING
    artifact_location: Optional[str] = MISSING  # where a new experiment keeps artifacts
    run_name: Optional[str] = MISSING
    system_metrics: bool = MISSING  # CPU/GPU/memory sampled by MLflow in the background
    tags: Dict[str, str] = MISSING  # extra tags on the run
    timeout_s: float = MISSING  # a store that stops answering mid-run ends the run after this long
    resume_without_record: bool = MISSING  # a re-run whose MLflow run is gone continues in a new one

    def __post_init__(self):
        _check(self.timeout_s > 0, f"tracking.timeout_s={self.timeout_s} must be positive")


@dataclass
class SweepConfig:
    """Set by a sweep file (`sweep=<name>`, files in sweeps/) and read by the Optuna sweeper
    (hydra/sweeper=soda_optuna, whose settings default to these). A trial learns its number and
    its MLflow parent run through `trial` and `parent_run_id`, which the sweeper adds."""

    study_name: Optional[str] = MISSING  # the Optuna study; same name = resume it
    study_suffix: str = MISSING  # an experiment file's: sweep files end their study_name with it (-demo)
    storage: str = MISSING  # a journal file, or postgresql://... (see soda/sweep.py)
    n_trials: Optional[int] = MISSING  # trials to finish; null = the whole grid
    n_jobs: int = MISSING  # trials in flight at once
    max_failure_rate: float = MISSING  # stop when more than this fraction of n_trials failed
    trial: Optional[int] = MISSING  # set by the sweeper in each trial's job
    parent_run_id: Optional[str] = MISSING  # set by the sweeper: the sweep's MLflow run

    def __post_init__(self):
        _check(self.n_trials is None or self.n_trials >= 1, f"sweep.n_trials={self.n_trials} must be >= 1 or null")
        _check(self.n_jobs >= 1, f"sweep.n_jobs={self.n_jobs} must be at least 1")
        _check(0.0 <= self.max_failure_rate <= 1.0, f"sweep.max_failure_rate={self.max_failure_rate} must be in [0, 1]")


METRICS = tracking.OBJECTIVES


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

    def model_arguments(self) -> dict[str, Any]:
        """soda.models.build_soda's arguments: the model node, plus what the data set decides."""
        model = {key: value for key, value in asdict(self.model).items() if key != "name"}
        data = self.dataset
        return {**model, "image_size": data.image_size, "input_mean": tuple(data.mean), "input_std": tuple(data.std)}

    def __post_init__(self):
        _check(self.device in DEVICES, f"device={self.device!r}; allowed: {', '.join(DEVICES)}")
        _check(
            self.peer_timeout_s is None or self.peer_timeout_s >= 2,
            f"peer_timeout_s={self.peer_timeout_s} must be at least 2 (seconds) or null",
        )
        names = [self.objective] if isinstance(self.objective, str) else list(self.objective or [])
        factors = [tracking.factor_metric(name) for name in SHAPE_FACTORS] if self.dataset.name == "shapes" else []
        _check(
            bool(names) and all(name in METRICS or name in factors for name in names),
            f"objective={self.objective!r} must be one of {', '.join([*METRICS, *factors])}, or a list of them",
        )
        if not isinstance(self.objective, str):
            self.objective = names
        _check(
            tracking.RECON_MSE not in names or self.eval.num_reconstructions > 0,
            f"objective {tracking.RECON_MSE} needs eval.num_reconstructions > 0",
        )
        _check(
            tracking.LATENT_GAP not in names or self.eval.latent_gap_images > 0,
            f"objective {tracking.LATENT_GAP} needs eval.latent_gap_images > 0",
        )
        steps = self.model.timesteps
        _check(
            all(0 <= t < steps for t in self.eval.latent_gap_timesteps),
            f"eval.latent_gap_timesteps={list(self.eval.latent_gap_timesteps)} must lie in 0..{steps - 1} "
            f"(model.timesteps={steps})",
        )
        self._check_what_the_run_builds()

    def _check_what_the_run_builds(self) -> None:
        """The checks the run makes when it builds the model and reads the data, made here so that a
        job is refused before it is launched, not after."""
        dataset_keys = {"image_size": "dataset.image_size", "input_mean": "dataset.mean", "input_std": "dataset.std"}
        _build_check(
            check_soda_arguments, name=lambda key: dataset_keys.get(key, f"model.{key}"), **self.model_arguments()
        )
        steps, sample_steps = self.model.timesteps, self.eval.sample_steps
        _check(
            self.eval.num_reconstructions == 0 or sample_steps <= steps,
            f"eval.sample_steps={sample_steps} must be at most model.timesteps={steps} (DDIM visits at most every "
            "timestep); lower it, or set eval.num_reconstructions=0",
        )
        train, test = self.dataset.known_size("train"), self.dataset.known_size("test")
        if train is not None:
            count, key = train
            batch = self.schedule.batch_size
            _check(
                batch <= count,
                f"schedule.batch_size={batch} is larger than the training set ({key}={count} images); lower it",
            )
        if test is not None and self.eval.latent_gap_images > 0:
            count, key = test
            _check(
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
    "tracking_uri": tracking.default_tracking_uri,
    "artifact_location": tracking.default_artifact_location,
    "sweep_storage": tracking.default_sweep_storage,
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
        _check(not missing, f"no value for {', '.join(missing)}: give one in conf/ or as key=value on the command line")
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


@dataclass
class _Flag:
    value: bool = False


def parse_flag(key: str, value: Any, text: str | None = None) -> bool:
    """A boolean flag's value (`hydra.launcher.dry_run`, ...) as OmegaConf reads it into a `bool`
    field, which is how the launchers get it: true/false, yes/no, y/n, on/off in any case, and
    integers (0 is false, any other true). The one rule for every boolean flag, so that launch.py
    never reads one way what a launcher reads another; anything else is a one-line ConfigError
    (quoting `text`, the value as the user wrote it, when given)."""
    from omegaconf.errors import ValidationError

    flag = OmegaConf.structured(_Flag)
    try:
        flag.value = value
    except ValidationError:
        raise ConfigError(
            f"{key}={value if text is None else text} is neither true nor false; give true or false (yes/no, on/off and 1/0 are read too)"
        ) from None
    return bool(flag.value)


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
