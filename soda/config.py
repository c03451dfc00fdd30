"""The run configuration: typed schemas for Hydra's config groups, validated before any work.

Hydra composes `conf/` on top of these schemas (registered as `soda_schema`), so a key that is
not here is an error and a value of the wrong type is an error. Ranges are checked when the
composed config is turned into these dataclasses (`to_settings`), which `soda.train.run` does
first thing. This is the one place in `soda/` that knows about Hydra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional  # noqa: UP035 - OmegaConf needs typing's generics

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from soda.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "fp16", "bf16")
# torch.compile modes for the training loss; auto = "default" on CUDA, eager elsewhere.
COMPILE_MODES = ("auto", "none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DATASETS = ("cifar10", "cifar100", "tiny_imagenet", "imagefolder", "shapes")
DEVICES = ("auto", "cpu", "cuda")
LINEAR_PROBE_WHEN = ("every", "last")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    name: str = "soda_r18_ddpm"
    arch: str = "resnet18"
    latent_dim: int = 128
    small_images: bool = True
    base_channels: int = 128
    channel_mults: List[int] = field(default_factory=lambda: [1, 2, 2, 2])  # noqa: UP006
    attention_levels: List[bool] = field(default_factory=lambda: [False, True, False, False])  # noqa: UP006
    blocks_per_level: int = 2
    attention_heads: int = 1
    dropout: float = 0.1
    norm_groups: int = 32
    layer_groups: int = 1
    layer_mask_prob: float = 0.0
    latent_drop_prob: float = 0.1
    source_noise_std: float = 0.1
    noise_schedule: str = "linear"
    timesteps: int = 1000
    beta_start: float = 1.0e-4
    beta_end: float = 0.02
    # Model-level validation happens when soda.models.build_soda builds it (before any data).


@dataclass
class DatasetConfig:
    name: str = "cifar10"
    root: str = "./data/cifar10"
    image_size: int = 32
    num_classes: int = 10
    mean: List[float] = field(default_factory=lambda: [0.4914, 0.4822, 0.4465])  # noqa: UP006
    std: List[float] = field(default_factory=lambda: [0.2023, 0.1994, 0.2010])  # noqa: UP006
    download: bool = True  # torchvision download when the files are missing (needs network)
    train_limit: Optional[int] = None  # noqa: UP045 - use only the first N training images (quick runs)
    test_limit: Optional[int] = None  # noqa: UP045
    train_size: int = 0  # shapes only: how many images to generate
    test_size: int = 0  # shapes only

    def __post_init__(self):
        _check(self.name in DATASETS, f"dataset.name={self.name!r} is not known; allowed: {', '.join(DATASETS)}")
        _check(self.image_size >= 8, f"dataset.image_size={self.image_size} must be at least 8")
        _check(self.num_classes >= 2, f"dataset.num_classes={self.num_classes} must be at least 2")
        _check(len(self.mean) == 3 and len(self.std) == 3, "dataset.mean and dataset.std need 3 values (RGB)")
        _check(all(s > 0 for s in self.std), f"dataset.std={list(self.std)} must be positive")
        for key in ("train_limit", "test_limit"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"dataset.{key}={value} must be null or a positive count")
        if self.name == "shapes":
            _check(self.train_size >= 1 and self.test_size >= 1, "dataset.train_size and test_size must be positive")


@dataclass
class ViewConfig:
    """One view's augmentation, in the reference's order: with probability `crop_prob` a random
    resized crop followed by a horizontal flip (p = flip_prob); then with probability
    `randaugment_prob` RandAugment. A view with everything at 0 is the image as stored."""

    name: str = "reference"  # the option of conf/augmentation/view/ it came from (for tables)
    crop_prob: float = 0.95
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # noqa: UP006
    crop_ratio: List[float] = field(default_factory=lambda: [0.75, 1.3333333])  # noqa: UP006
    flip_prob: float = 0.5
    randaugment_prob: float = 0.65
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9

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
    name: str = "seed"
    source: ViewConfig = field(default_factory=ViewConfig)
    target: ViewConfig = field(default_factory=ViewConfig)

    def __post_init__(self):
        self.source.validate("augmentation.source")
        self.target.validate("augmentation.target")


@dataclass
class ScheduleConfig:
    name: str = "reference_800ep"
    epochs: int = 800
    warmup_epochs: float = 20.0
    batch_size: int = 512  # global batch (all ranks together)
    decoder_lr: float = 4.0e-4  # already scaled for the global batch; nothing multiplies it later
    encoder_lr_ratio: float = 2.0  # encoder lr = decoder_lr * encoder_lr_ratio
    weight_decay: float = 0.05
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.95])  # noqa: UP006
    grad_clip: Optional[float] = 1.0  # noqa: UP045 - max gradient norm; null = no clipping
    ema_decay: float = 0.9999
    ema_update_every: int = 1
    ema_warmup_power: float = 0.6666667  # ema-pytorch's warm-up: decay = 1 - (1 + step) ** -power, capped
    precision: str = "bf16"  # the seed used fp16; bf16 needs no loss scaler (and its host syncs)
    compile: str = "auto"  # torch.compile mode of the loss: auto (compile on CUDA), none, or a mode
    channels_last: Optional[bool] = None  # noqa: UP045 - NHWC weights and views; null = on a CPU only
    checkpoint_every: int = 100  # epochs; a checkpoint is also written at the end
    log_every: int = 50  # optimiser steps between train/loss points
    # Stop training after this many seconds, counted from the end of the first optimiser step (so
    # compilation is not in it) and without the evaluations; then evaluate and finish. null = off.
    train_seconds: Optional[float] = None  # noqa: UP045

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
    name: str = "reference"
    every: int = 100  # epochs between probe evaluations; the last epoch is always evaluated
    # Also evaluate at the end of an epoch once this many seconds of training passed since the last
    # evaluation (for time-boxed runs, see schedule.train_seconds). null = by epochs only.
    every_seconds: Optional[float] = None  # noqa: UP045
    at_start: bool = False  # also evaluate the untrained encoder (epoch 0), a baseline
    linear_probe: str = "every"  # every: at each evaluation; last: only at the final one (k-NN always)
    batch_size: int = 512  # feature extraction batch
    knn_k: int = 20
    knn_vote: str = "uniform"  # uniform (the reference) | weighted (DINO)
    knn_temperature: float = 0.07
    probe_epochs: int = 15
    probe_lr: float = 1.0e-3
    probe_batch_size: int = 128
    probe_augmented_copies: int = 0  # extra augmented passes over the training set for the probe
    probe_augmentation: ViewConfig = field(
        default_factory=lambda: ViewConfig(name="probe", crop_prob=0.65, randaugment_prob=0.0)
    )
    num_reconstructions: int = 8  # test images reconstructed into the grid at each eval (0 = none)
    sample_steps: int = 100
    sample_eta: float = 0.0
    guidance: float = 0.3
    # eval/latent_gap: how much worse the decoder predicts noise with another image's latent than
    # with its own, on the first latent_gap_images test images (0 = off) at these timesteps.
    latent_gap_images: int = 512
    latent_gap_timesteps: List[int] = field(default_factory=lambda: [500, 700])  # noqa: UP006

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
    name: str = "local"
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "soda"
    artifact_location: Optional[str] = None  # noqa: UP045 - where a new experiment keeps artifacts
    run_name: Optional[str] = None  # noqa: UP045
    system_metrics: bool = True  # CPU/GPU/memory sampled by MLflow in the background
    tags: Dict[str, str] = field(default_factory=dict)  # noqa: UP006 - extra tags on the run


@dataclass
class SweepConfig:
    """Set by a sweep file (`sweep=<name>`, files in sweeps/) and read by the Optuna sweeper
    (hydra/sweeper=optuna, whose settings default to these). A trial learns its number and
    its MLflow parent run through `trial` and `parent_run_id`, which the sweeper adds."""

    study_name: Optional[str] = None  # noqa: UP045 - the Optuna study; same name = resume it
    storage: str = "${repo_root:}/optuna-journal.log"  # a journal file, or postgresql://... (see soda/sweep.py)
    n_trials: Optional[int] = None  # noqa: UP045 - trials to finish; null = the whole grid
    n_jobs: int = 1  # trials in flight at once
    max_failure_rate: float = 0.25  # stop when more than this fraction of n_trials failed
    trial: Optional[int] = None  # noqa: UP045 - set by the sweeper in each trial's job
    parent_run_id: Optional[str] = None  # noqa: UP045 - set by the sweeper: the sweep's MLflow run

    def __post_init__(self):
        _check(self.n_trials is None or self.n_trials >= 1, f"sweep.n_trials={self.n_trials} must be >= 1 or null")
        _check(self.n_jobs >= 1, f"sweep.n_jobs={self.n_jobs} must be at least 1")
        _check(0.0 <= self.max_failure_rate <= 1.0, f"sweep.max_failure_rate={self.max_failure_rate} must be in [0, 1]")


METRICS = ("eval/knn_acc", "eval/linear_acc", "eval/recon_mse", "eval/latent_gap")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seed: int = 0
    # The metric launch.py returns (what a sweeper optimises); a list for multi-objective sweeps.
    objective: Any = "eval/linear_acc"
    device: str = "auto"  # auto = cuda when available, else cpu

    def __post_init__(self):
        _check(self.device in DEVICES, f"device={self.device!r}; allowed: {', '.join(DEVICES)}")
        names = [self.objective] if isinstance(self.objective, str) else list(self.objective or [])
        _check(
            bool(names) and all(name in METRICS for name in names),
            f"objective={self.objective!r} must be one of {', '.join(METRICS)}, or a list of them",
        )
        if not isinstance(self.objective, str):
            self.objective = names
        _check(
            "eval/recon_mse" not in names or self.eval.num_reconstructions > 0,
            "objective eval/recon_mse needs eval.num_reconstructions > 0",
        )
        _check(
            "eval/latent_gap" not in names or self.eval.latent_gap_images > 0,
            "objective eval/latent_gap needs eval.latent_gap_images > 0",
        )
        steps = self.model.timesteps
        _check(
            all(0 <= t < steps for t in self.eval.latent_gap_timesteps),
            f"eval.latent_gap_timesteps={list(self.eval.latent_gap_timesteps)} must lie in 0..{steps - 1} "
            f"(model.timesteps={steps})",
        )


def register() -> None:
    """Make the schema known to Hydra (conf/config.yaml lists `soda_schema` first)."""
    ConfigStore.instance().store(name="soda_schema", node=Config)
    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))


def to_settings(cfg: DictConfig) -> Config:
    """Validated dataclasses from a composed config; a bad value is a one-line ConfigError."""
    try:
        schema = OmegaConf.structured(Config)
        merged = OmegaConf.merge(schema, cfg)
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except Exception as error:  # OmegaConf's validation errors are multi-line; keep the first line
        raise ConfigError(str(error).splitlines()[0]) from error


register()
