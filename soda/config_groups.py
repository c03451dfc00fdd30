"""The schemas of the run's config groups (model, dataset, augmentation, schedule, eval, tracking,
sweep), each checking its own ranges when it is built. soda.config assembles them into the run's
`Config`, registers it with Hydra and turns a composition into it (`to_settings`).

A field that a YAML file in conf/ sets is MISSING ("???") here, so a composition that lacks it is an
error naming the key; the few fields no YAML file needs to set keep their one default here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Dict, List, Optional  # OmegaConf needs typing's generics

from omegaconf import MISSING

from soda.data import shapes
from soda.errors import ConfigError

PRECISIONS = ("fp32", "fp16", "bf16")
# torch.compile modes for the training loss; auto = "default" on CUDA, eager elsewhere.
COMPILE_MODES = ("auto", "none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# dataset.name: cifar10, cifar100, tiny_imagenet and shapes have loaders of their own; any other
# name (imagefolder, or one of your own) is read as an image folder. The name is part of the
# cache's file names, so it must be a plain word.
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
DEVICES = ("auto", "cpu", "cuda")
LINEAR_PROBE_WHEN = ("every", "last")


def check_value(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def build_check(check: Callable[..., None], *args, **kwargs) -> None:
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
        check_value(
            DATASET_NAME.fullmatch(self.name) is not None,
            f"dataset.name={self.name!r} must start with a letter or digit and hold only letters, digits, _ "
            "and - (it names the cache files)",
        )
        check_value(self.image_size >= 8, f"dataset.image_size={self.image_size} must be at least 8")
        check_value(self.num_classes >= 2, f"dataset.num_classes={self.num_classes} must be at least 2")
        check_value(len(self.mean) == 3 and len(self.std) == 3, "dataset.mean and dataset.std need 3 values (RGB)")
        check_value(all(s > 0 for s in self.std), f"dataset.std={list(self.std)} must be positive")
        for key in ("train_limit", "test_limit"):
            value = getattr(self, key)
            check_value(value is None or value >= 1, f"dataset.{key}={value} must be null or a positive count")
        if self.name == "shapes":
            check_value(
                self.train_size >= 1 and self.test_size >= 1, "dataset.train_size and test_size must be positive"
            )
            build_check(shapes.check_class_count, self.num_classes, name=lambda key: f"dataset.{key}")

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
            check_value(0.0 <= value <= 1.0, f"{where}.{key}={value} must be a probability in [0, 1]")
        low, high = self.crop_scale
        check_value(
            0 < low <= high <= 1, f"{where}.crop_scale={list(self.crop_scale)} must satisfy 0 < min <= max <= 1"
        )
        low, high = self.crop_ratio
        check_value(0 < low <= high, f"{where}.crop_ratio={list(self.crop_ratio)} must satisfy 0 < min <= max")
        check_value(self.randaugment_ops >= 0, f"{where}.randaugment_ops must be >= 0")
        check_value(0 <= self.randaugment_magnitude <= 30, f"{where}.randaugment_magnitude must be in [0, 30]")


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
        check_value(self.epochs >= 1, f"schedule.epochs={self.epochs} must be at least 1")
        check_value(self.warmup_epochs >= 0, f"schedule.warmup_epochs={self.warmup_epochs} must be >= 0")
        check_value(self.batch_size >= 2, f"schedule.batch_size={self.batch_size} must be at least 2")
        check_value(self.decoder_lr > 0, f"schedule.decoder_lr={self.decoder_lr} must be positive")
        check_value(self.encoder_lr_ratio > 0, f"schedule.encoder_lr_ratio={self.encoder_lr_ratio} must be positive")
        check_value(self.weight_decay >= 0, f"schedule.weight_decay={self.weight_decay} must be >= 0")
        check_value(
            len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
            f"schedule.adam_betas={list(self.adam_betas)} must be two values in [0, 1)",
        )
        check_value(
            self.grad_clip is None or self.grad_clip > 0,
            f"schedule.grad_clip={self.grad_clip} must be positive or null",
        )
        check_value(0 <= self.ema_decay < 1, f"schedule.ema_decay={self.ema_decay} must be in [0, 1)")
        check_value(self.ema_update_every >= 1, f"schedule.ema_update_every={self.ema_update_every} must be >= 1")
        check_value(
            self.precision in PRECISIONS, f"schedule.precision={self.precision!r}; allowed: {', '.join(PRECISIONS)}"
        )
        check_value(
            self.compile in COMPILE_MODES, f"schedule.compile={self.compile!r}; allowed: {', '.join(COMPILE_MODES)}"
        )
        check_value(self.checkpoint_every >= 1, f"schedule.checkpoint_every={self.checkpoint_every} must be >= 1")
        check_value(self.log_every >= 1, f"schedule.log_every={self.log_every} must be >= 1")
        check_value(
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
        check_value(self.every >= 1, f"eval.every={self.every} must be at least 1")
        check_value(
            self.every_seconds is None or self.every_seconds > 0,
            f"eval.every_seconds={self.every_seconds} must be positive or null",
        )
        check_value(
            self.linear_probe in LINEAR_PROBE_WHEN,
            f"eval.linear_probe={self.linear_probe!r}; allowed: {', '.join(LINEAR_PROBE_WHEN)}",
        )
        check_value(
            self.latent_gap_images == 0 or self.latent_gap_images >= 2,
            f"eval.latent_gap_images={self.latent_gap_images} must be 0 to turn it off, or at least 2",
        )
        check_value(bool(self.latent_gap_timesteps), "eval.latent_gap_timesteps needs at least one timestep")
        check_value(self.batch_size >= 1, f"eval.batch_size={self.batch_size} must be positive")
        check_value(self.knn_k >= 1, f"eval.knn_k={self.knn_k} must be positive")
        check_value(
            self.knn_vote in ("uniform", "weighted"), f"eval.knn_vote={self.knn_vote!r}; allowed: uniform, weighted"
        )
        check_value(self.knn_temperature > 0, f"eval.knn_temperature={self.knn_temperature} must be positive")
        check_value(
            self.probe_epochs >= 1 and self.probe_lr > 0 and self.probe_batch_size >= 2,
            "eval.probe_epochs >= 1, eval.probe_lr > 0 and eval.probe_batch_size >= 2 are required",
        )
        check_value(self.probe_augmented_copies >= 0, "eval.probe_augmented_copies must be >= 0")
        self.probe_augmentation.validate("eval.probe_augmentation")
        check_value(self.num_reconstructions >= 0, "eval.num_reconstructions must be >= 0")
        check_value(self.sample_steps >= 1, f"eval.sample_steps={self.sample_steps} must be at least 1")
        check_value(self.sample_eta >= 0 and self.guidance >= 0, "eval.sample_eta and eval.guidance must be >= 0")


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
        check_value(self.timeout_s > 0, f"tracking.timeout_s={self.timeout_s} must be positive")


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
        check_value(self.n_trials is None or self.n_trials >= 1, f"sweep.n_trials={self.n_trials} must be >= 1 or null")
        check_value(self.n_jobs >= 1, f"sweep.n_jobs={self.n_jobs} must be at least 1")
        check_value(
            0.0 <= self.max_failure_rate <= 1.0, f"sweep.max_failure_rate={self.max_failure_rate} must be in [0, 1]"
        )
