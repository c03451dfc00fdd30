"""What a training loop (soda.loop.Trainer) is built from, in four parts: the views it trains on,
how the weights move, how long it trains and how often it stops to log, evaluate and checkpoint,
and what it tells the outside. soda.build makes them from the config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from soda.data import LabelledImages, ViewAugmentation
from soda.models import SODA

# evaluate(ema_model, epoch, last) -> metrics; on_evaluation(epoch, metrics) -> stop the run?
Evaluate = Callable[[SODA, int, bool], dict[str, float]]
OnEvaluation = Callable[[int, dict[str, float]], bool]


@dataclass(frozen=True)
class Views:
    """What the loop trains on: the decoded images and how each of their two views is drawn."""

    train_set: LabelledImages
    source_augment: ViewAugmentation  # the encoder's view
    target_augment: ViewAugmentation | None  # the decoder's view; None: the same settings


@dataclass(frozen=True)
class Optimization:
    """How the weights move: AdamW with the encoder at its own rate, clipping, precision, the EMA."""

    decoder_lr: float  # already scaled for the global batch
    encoder_lr_ratio: float  # encoder lr = decoder_lr * encoder_lr_ratio
    weight_decay: float
    adam_betas: tuple[float, float]
    grad_clip: float | None  # max gradient norm; None = no clipping
    ema_decay: float
    ema_update_every: int
    ema_warmup_power: float
    precision: str  # fp32 | fp16 | bf16 autocast
    compile: str  # torch.compile mode of the loss (soda.compiled.compile_loss)
    channels_last: bool | None  # NHWC weights and views; None = on a CPU only


@dataclass(frozen=True)
class Schedule:
    """How long the run trains and how often it logs, evaluates and checkpoints."""

    epochs: int  # epochs to train
    warmup_epochs: float  # linear learning-rate warm-up
    batch_size: int  # global batch, all ranks together
    checkpoint_every: int  # epochs
    log_every: int  # optimiser steps between train/loss points (and host syncs)
    train_seconds: float | None  # training-clock budget; None = all epochs
    eval_every: int  # epochs between evaluations; the last epoch is always evaluated
    eval_every_seconds: float | None  # also evaluate after this much training clock
    eval_at_start: bool  # also evaluate the untrained encoder (epoch 0)


@dataclass(frozen=True)
class Hooks:
    """What the loop tells the outside: evaluations and their results, training metrics."""

    evaluate: Evaluate  # probes of the EMA model (rank 0 only)
    on_evaluation: OnEvaluation | None = None  # where each evaluation's metrics go
    tracker: object = None  # training metrics and the run id; NullTracker when None
