"""The reference training loop, on plain values: AdamW, linear warm-up then a constant learning
rate, gradient-norm clipping, EMA every step, mixed precision, checkpoints, a training clock.

`soda.train.run` reads the config and builds (soda.build) everything this loop is handed, in a few
parts (soda.trainer_parts): the model, the decoded images and the two view augmentations, the
optimisation, the schedule, the evaluation and what to do with its result. The loop knows nothing of Hydra or Optuna: it reports each evaluation through `on_evaluation`, whose
answer (stop or go on) is how a sweep's pruner ends a trial.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from soda import dist, progress
from soda.checkpoint import rng_state, save_checkpoint, trainer_state
from soda.compiled import compile_state
from soda.diagnostics import training_diagnostics
from soda.divergence import DivergenceWatch
from soda.errors import ConfigError
from soda.models import SODA
from soda.record import (
    EPOCH_SECONDS,
    EVAL_SECONDS,
    FIRST_STEP_SECONDS,
    IMAGES_PER_SECOND,
    IMAGES_SEEN,
    TRAIN_LOSS,
    TRAIN_LR,
    TRAIN_SECONDS,
    shown_order,
)
from soda.tracking import NullTracker
from soda.trainer_parts import Hooks, Optimization, Schedule, Views, optimizer_parts, place_model

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoints/last.pt"
PACE_STEPS = 10  # steps after the first (or an epoch's, if fewer) that time the pace for Trainer.on_pace


class Preempted(Exception):
    """Raised by the loop after it saved a checkpoint because SIGUSR1/SIGUSR2 arrived."""


class StopRequested(Exception):
    """Raised on every rank when `on_evaluation` asked to stop (a sweep's pruner, for example)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One run's training state and loop. Only global rank 0 keeps the EMA and evaluates; the
    `tracker` of the other ranks records nothing (soda.tracking.NullTracker)."""

    def __init__(
        self,
        model: SODA,
        views: Views,
        optimization: Optimization,
        schedule: Schedule,
        hooks: Hooks,
        *,
        run_dir: Path,  # where checkpoints go
        device: torch.device,
        world: dist.Distributed | None = None,
        seed: int = 0,  # data order and per-rank draws
        signature: dict | None = None,  # what a checkpoint must share with the run resuming it
    ):
        self.run_dir = run_dir
        self.device = device
        self.tracker = hooks.tracker if hooks.tracker is not None else NullTracker()
        self.world = world or dist.Distributed()
        self.evaluate = hooks.evaluate
        self.on_evaluation = hooks.on_evaluation or (lambda epoch, metrics: False)
        self.seed = seed
        self.signature = dict(signature or {})
        self.epochs, self.batch_size = schedule.epochs, schedule.batch_size
        self.checkpoint_every, self.log_every = schedule.checkpoint_every, schedule.log_every
        self.grad_clip, self.decoder_lr = optimization.grad_clip, optimization.decoder_lr
        self.train_budget = schedule.train_seconds
        self.eval_every, self.eval_every_seconds = schedule.eval_every, schedule.eval_every_seconds
        self.eval_at_start = schedule.eval_at_start

        self.model, self.forward, self.memory_format = place_model(
            model, device, self.world, optimization.channels_last
        )
        # Data: the decoded set sits on the training device; batches are indexed from it directly.
        self.train_set = views.train_set
        self.train_images = views.train_set.images.to(device)
        self.source_augment = views.source_augment
        self.target_augment = views.target_augment
        # The optimiser, the precision, the EMA (rank 0 only) and the (compiled) loss.
        parts = optimizer_parts(optimization, self.model, self.forward, device, self.world.is_main)
        self.base_lrs, self.optimizer, self.scaler = parts.base_lrs, parts.optimizer, parts.scaler
        self.autocast_dtype, self.ema, self.loss_fn = parts.autocast_dtype, parts.ema, parts.loss_fn

        # Progress.
        self.rank_batch = schedule.batch_size // self.world.world_size
        self.steps_per_epoch = len(self.train_set) // schedule.batch_size
        self.warmup_steps = max(1, round(schedule.warmup_epochs * self.steps_per_epoch))
        self.epoch = 0  # last completed epoch
        self.step_in_epoch = 0  # steps of epoch + 1 already done (a preempted epoch resumes there)
        self.global_step = 0
        self.metrics: dict[str, float] = {}
        self.diagnostics: dict[str, torch.Tensor] = {}  # of the last log point's step (training_diagnostics)
        # The training clock (train_seconds, eval_every_seconds): seconds spent in training steps,
        # from the end of this process's first step (which compiles), without evaluations; it
        # goes on across a resume.
        self.train_seconds = 0.0
        self.last_eval_seconds = 0.0
        self.first_step_done = False
        # Called once, on rank 0, with the seconds of training left at the pace of the first
        # PACE_STEPS steps after the first (soda.train warns with it when a run landed on CPUs).
        self.on_pace: Callable[[float], None] | None = None
        self.out_of_time = False
        self.preempt_requested = False
        self.preempt_signal = signal.SIGUSR1
        # Recent wall seconds of a whole epoch's training, an evaluation and a checkpoint: the
        # time left that each epoch line shows.
        self.recent_seconds = {part: deque(maxlen=5) for part in ("epoch", "eval", "save")}
        self.divergence = DivergenceWatch(device)
        # Augmentation, timestep and noise draws differ per rank, seeded from the global rank.
        torch.manual_seed(seed * 1_000 + self.world.rank)

    @property
    def compile_state(self) -> str:
        """eager (not asked for), compiled, or fallback (compiling failed: training ran eager)."""
        return compile_state(self.loss_fn)

    def request_preemption(self, signum=signal.SIGUSR1, frame=None) -> None:
        """SIGUSR1/SIGUSR2 (SLURM's warning before a time limit or preemption): finish the
        current step, write a checkpoint, then stop; the requeued job resumes from it."""
        self.preempt_requested = True
        self.preempt_signal = signum

    # ----------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train the remaining epochs; returns the last evaluation's metrics (on rank 0)."""
        if self.epoch == 0 and self.step_in_epoch == 0 and self.eval_at_start:
            with self._timed("eval"):
                self._evaluate_on_main(epoch=0, last=False)
        # A resumed time-boxed run that had spent its budget is finished (a larger budget goes on).
        self.out_of_time = self._spent(self.train_seconds)
        while self.epoch < self.epochs and not self.out_of_time:
            epoch = self.epoch + 1
            self.train_epoch(epoch)
            # A time-boxed run stops inside an epoch: that partial epoch counts as the last one.
            self.epoch, self.step_in_epoch = epoch, 0
            self.out_of_time = self._spent(self.train_seconds)
            last = epoch == self.epochs or self.out_of_time
            if last or epoch % self.eval_every == 0 or self._evaluation_due():
                with self._timed("eval"):
                    self._evaluate_on_main(epoch, last)
            if last or epoch % self.checkpoint_every == 0:
                with self._timed("save"):
                    self.save()
        self._raise_if_diverged()
        if self.world.is_main and not self.metrics:  # resumed a run that had already finished
            raise ConfigError("this run directory holds a finished run without metrics; use a new run directory")
        return self.metrics

    @contextlib.contextmanager
    def _timed(self, part: str):
        started = time.perf_counter()
        yield
        self.recent_seconds[part].append(time.perf_counter() - started)

    def _eta(self, epoch: int) -> str:
        """`eta 9h05m`: the rest of the run at the recent pace, this epoch's evaluation and
        checkpoint included; `(schedule.train_seconds)` when the training clock's budget ends it
        first. Before the first evaluation (or checkpoint) their time is not known yet, and not counted."""
        mean = {part: sum(times) / len(times) if times else 0.0 for part, times in self.recent_seconds.items()}
        seconds, budget_ends_it = progress.eta_seconds(
            epoch=epoch,
            epochs=self.epochs,
            epoch_seconds=mean["epoch"],
            eval_seconds=mean["eval"],
            save_seconds=mean["save"],
            eval_every=self.eval_every,
            checkpoint_every=self.checkpoint_every,
            seconds_left=None if self.train_budget is None else self.train_budget - self.train_seconds,
            eval_every_seconds=self.eval_every_seconds,
        )
        return f"eta {progress.duration(seconds)}" + (" (schedule.train_seconds)" if budget_ends_it else "")

    def _spent(self, seconds: float) -> bool:
        """Has the training clock reached the budget (on any rank: all stop together)?"""
        return self.train_budget is not None and dist.any_rank(seconds >= self.train_budget, self.device)

    def _evaluation_due(self) -> bool:
        """eval_every_seconds of training since the last evaluation (on any rank)?"""
        every = self.eval_every_seconds
        return every is not None and dist.any_rank(self.train_seconds - self.last_eval_seconds >= every, self.device)

    def _evaluate_on_main(self, epoch: int, last: bool) -> None:
        """Rank 0 evaluates; the others wait on a gloo barrier, which costs them nothing. The
        probes are cheap next to training, and a single process keeps them deterministic."""
        # A diverged EMA model would still give the probes something to score (a finite
        # accuracy), which a sweep would take for a result.
        self._raise_if_diverged()
        self.last_eval_seconds = self.train_seconds
        stop = False
        if self.world.is_main:
            started = time.perf_counter()
            # Stage lines while the probes run (soda.progress): an evaluation can take minutes.
            with progress.narrate(f"eval epoch {epoch}", log):
                self.metrics = {k: float(v) for k, v in self.evaluate(self.ema.ema_model, epoch, last).items()}
            seconds = time.perf_counter() - started
            counters = {
                EVAL_SECONDS: seconds,
                # Progress in images and training seconds: comparable across batch sizes, GPU
                # counts and time-boxed runs.
                IMAGES_SEEN: float(self.global_step * self.batch_size),
                TRAIN_SECONDS: self.train_seconds,
            }
            shown = "  ".join(f"{k}={v:.4f}" for k, v in shown_order(self.metrics))
            log.info("eval epoch %d: %s  (%.1f s)", epoch, shown, seconds)
            stop = bool(self.on_evaluation(epoch, {**self.metrics, **counters}))
        dist.wait_for_all()
        if dist.any_rank(stop, self.device):
            raise StopRequested(f"pruned at epoch {epoch}")

    def _raise_if_diverged(self) -> None:
        """DivergenceError on every rank if any rank saw a non-finite step (soda.divergence)."""
        self.divergence.raise_if_diverged(self.global_step)

    def save(self) -> None:
        """Checkpoint on rank 0 (with every rank's RNG state); all ranks leave together."""
        # Before anything is written: a diverged model must never replace the last good checkpoint.
        self._raise_if_diverged()
        rng_states = dist.gather_to_main(rng_state(self.device))
        if self.world.is_main:
            save_checkpoint(self.run_dir / CHECKPOINT, trainer_state(self, rng_states))
        dist.wait_for_all()

    # ----------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> None:
        # One global order per epoch, the same on every rank; each rank takes its slice of each
        # global batch, so the global batch is the same whatever the number of ranks.
        order_rng = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train_set), generator=order_rng).to(self.device)
        offset = self.world.rank * self.rank_batch
        self.model.train()
        running, count = torch.zeros((), device=self.device), 0
        started, first = time.perf_counter(), self.step_in_epoch
        clock_at_start = self.train_seconds
        bar = tqdm(
            range(first, self.steps_per_epoch),
            desc=f"epoch {epoch}/{self.epochs}",
            leave=False,
            disable=None if self.world.is_main else True,
        )
        for index in bar:
            # Step.
            start = index * self.batch_size + offset
            loss = self.train_step(self.train_images[order[start : start + self.rank_batch]])
            self.step_in_epoch = index + 1
            running += loss.detach()
            count += 1
            if not self.first_step_done:
                # The first step of a process compiles and autotunes: time what comes after it.
                _sync(self.device)
                self._first_step_finished(time.perf_counter() - started)
                started, first = time.perf_counter(), index + 1
            self.train_seconds = clock_at_start + time.perf_counter() - started
            timed = index + 1 - first  # steps since the first of the process (or of this epoch)
            if self.on_pace is not None and timed and (timed >= PACE_STEPS or index + 1 == self.steps_per_epoch):
                self._report_pace(epoch, index + 1, (time.perf_counter() - started) / timed)
            if self.global_step % self.log_every:
                continue

            # Log point: the only host syncs of the loop, once every log_every steps. The divergence
            # watch covers every step since the last point, so the mean below is finite.
            self._raise_if_diverged()
            value = dist.all_mean(running / count).item()
            # Only rank 0 diagnoses (the others record nothing).
            values = torch.stack(list(self.diagnostics.values())).tolist() if self.diagnostics else []
            diagnosed = dict(zip(self.diagnostics, values, strict=True))
            self.diagnostics = {}
            self.tracker.log_metrics(
                {TRAIN_LOSS: value, TRAIN_LR: self._lr_factor() * self.decoder_lr, **diagnosed},
                step=self.global_step,
            )
            bar.set_postfix(loss=f"{value:.4f}")
            running, count = torch.zeros((), device=self.device), 0

            # Stop early: preemption (checkpoint first, which a diverged run refuses) or the
            # training clock spent.
            if dist.any_rank(self.preempt_requested, self.device):
                self.save()
                raise Preempted(
                    f"preempted: checkpoint saved at epoch {epoch - 1} + {self.step_in_epoch} steps; "
                    "rerun the same command (or let SLURM requeue the job) to resume"
                )
            if self._spent(self.train_seconds):
                log.info("training clock budget of %s s spent in epoch %d", self.train_budget, epoch)
                break

        # Epoch throughput, without the first step of the process.
        _sync(self.device)
        seconds = time.perf_counter() - started
        self.train_seconds = clock_at_start + seconds
        steps = self.step_in_epoch - first
        throughput = steps * self.batch_size / seconds if steps and seconds > 0 else math.nan
        if steps:
            self.tracker.log_metrics({EPOCH_SECONDS: seconds, IMAGES_PER_SECOND: throughput}, step=epoch)
            # A whole epoch's time, also for an epoch that resumed mid-way or began with the first step.
            self.recent_seconds["epoch"].append(seconds * self.steps_per_epoch / steps)
        log.info("epoch %d/%d  %.1f s  %.0f images/s  %s", epoch, self.epochs, seconds, throughput, self._eta(epoch))

    def _report_pace(self, epoch: int, steps_done: int, step_seconds: float) -> None:
        """Hand on_pace the training time left (at `step_seconds` a step; within the budget), once."""
        steps_left = (self.epochs - epoch) * self.steps_per_epoch + self.steps_per_epoch - steps_done
        seconds = steps_left * step_seconds
        if self.train_budget is not None:
            seconds = min(seconds, max(0.0, self.train_budget - self.train_seconds))
        on_pace, self.on_pace = self.on_pace, None
        on_pace(seconds)

    def _first_step_finished(self, seconds: float) -> None:
        """Record how long this process's first step took (compilation, cuDNN autotuning)."""
        self.first_step_done = True
        self.tracker.log_metrics({FIRST_STEP_SECONDS: seconds}, step=self.global_step)
        log.info("first step (compilation, warm-up) took %.1f s", seconds)

    def train_step(self, images: torch.Tensor) -> torch.Tensor:
        """One optimiser step on a uint8 batch [N, 3, H, W] already on the device."""
        source_view, target_view = self.make_views(images)
        return self.optimize(source_view, target_view)

    def make_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two independent augmentations of each image. With the same settings for both
        views, one call on the doubled batch does both: the draws are per image anyway, and
        half the calls is half the per-op overhead."""
        if self.target_augment is None:
            both = self.source_augment(torch.cat([images, images]))
            return both[: images.shape[0]], both[images.shape[0] :]
        return self.source_augment(images), self.target_augment(images)

    def optimize(self, source_view: torch.Tensor, target_view: torch.Tensor) -> torch.Tensor:
        """Loss, backward, clip, AdamW, EMA, divergence watch; returns the loss as a device tensor
        (no host sync: nothing here reads a value back, so the CPU can queue the next step at once)."""
        # Learning rate: linear warm-up, then constant (a host-side step count, no sync).
        factor = self._lr_factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

        # Accumulate gradients.
        source_view = source_view.contiguous(memory_format=self.memory_format)
        target_view = target_view.contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss = self.loss_fn(source_view, target_view)
        self.scaler.scale(loss).backward()

        # Diagnostics on the steps that end at a log point only, as device tensors read back there
        # with the loss. Clipping and the diagnostics see the gradients at their true size
        # (step() knows they were unscaled).
        diagnose = self.world.is_main and (self.global_step + 1) % self.log_every == 0
        if diagnose or self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
        if diagnose:
            self.diagnostics = training_diagnostics(self.model, source_view)

        # Clip and step.
        grad_norm = None
        if self.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

        # Update EMA.
        if self.ema is not None:
            self.ema.update()
        self.global_step += 1

        # Watch for divergence. Under fp32 and bf16 a non-finite gradient norm poisons the
        # weights (clipping divides every gradient by it, then AdamW applies them) even when the
        # loss was finite; under fp16 the GradScaler skips such steps and lowers its scale, which
        # is its normal working, so there only the loss counts.
        if self.scaler.is_enabled():
            grad_norm = None
        self.divergence.fold(self.global_step, loss.detach(), grad_norm)
        return loss

    def _lr_factor(self) -> float:
        return min(1.0, (self.global_step + 1) / self.warmup_steps)
