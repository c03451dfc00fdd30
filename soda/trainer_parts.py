"""What a training loop (soda.loop.Trainer) is built from, in four parts: the views it trains on,
how the weights move, how long it trains and how often it stops to log, evaluate and checkpoint,
and what it tells the outside. soda.build makes them from the config; the Trainer turns them into
the model on its device (place_model) and what steps it (optimizer_parts)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from soda import dist
from soda.compiled import compile_loss
from soda.data import LabelledImages, ViewAugmentation
from soda.ema import SyncFreeEMA
from soda.models import SODA

# evaluate(ema_model, epoch, last) -> metrics; on_evaluation(epoch, metrics) -> stop the run?
Evaluate = Callable[[SODA, int, bool], dict[str, float]]
OnEvaluation = Callable[[int, dict[str, float]], bool]
PRECISION_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def place_model(model: SODA, device: torch.device, world: dist.Distributed, channels_last: bool | None):
    """(model, forward, memory_format): the model on the device, in its memory layout; `forward`
    is what the loss runs through (DDP when there are several ranks: gradients averaged across them)."""
    if world.enabled and device.type == "cuda":
        # Batch statistics over the global batch; NCCL only (PyTorch's SyncBatchNorm needs a GPU).
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type == "cuda":
        # Fixed shapes every step: let cuDNN pick its fastest convolution algorithms once.
        torch.backends.cudnn.benchmark = True
    channels_last = channels_last if channels_last is not None else device.type == "cpu"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    forward = model
    if world.enabled:
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, forward, memory_format


@dataclass(frozen=True)
class OptimizerParts:
    """What steps a placed model: made from its Optimization by optimizer_parts."""

    base_lrs: list[float]  # encoder's, decoder's (before the warm-up factor)
    optimizer: torch.optim.Optimizer
    autocast_dtype: torch.dtype | None  # None: fp32
    scaler: torch.amp.GradScaler
    ema: SyncFreeEMA | None  # rank 0 only
    loss_fn: Callable  # soda.compiled.compile_loss of `forward`


def optimizer_parts(
    o: Optimization, model: SODA, forward: torch.nn.Module, device: torch.device, is_main: bool
) -> OptimizerParts:
    """The optimiser, the precision, the EMA and the (compiled) loss of a placed `model`."""
    optimizer = torch.optim.AdamW(
        [{"params": model.encoder.parameters()}, {"params": model.decoder.parameters()}],
        lr=o.decoder_lr,
        betas=tuple(o.adam_betas),
        weight_decay=o.weight_decay,
        fused=device.type == "cuda",
    )
    # Only rank 0 evaluates, so only rank 0 keeps the EMA copy.
    ema = None
    if is_main:
        ema = SyncFreeEMA(
            model,
            beta=o.ema_decay,
            update_after_step=0,
            update_every=o.ema_update_every,
            power=o.ema_warmup_power,
            include_online_model=False,
        )
    return OptimizerParts(
        base_lrs=[o.decoder_lr * o.encoder_lr_ratio, o.decoder_lr],
        optimizer=optimizer,
        autocast_dtype=PRECISION_DTYPES[o.precision],
        scaler=torch.amp.GradScaler(device.type, enabled=o.precision == "fp16"),
        ema=ema,
        # The loss, compiled where that pays; the EMA and the probes use the plain modules, and
        # checkpoints hold the plain state_dict.
        loss_fn=compile_loss(forward, o.compile, device),
    )
