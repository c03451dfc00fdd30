"""One training run: config in; a trained encoder, probe accuracies and an MLflow record out.

`run(cfg)` unpacks the composed Hydra config (the only place that reads it) and hands plain
values to the pieces: the model, the data, the `Trainer` loop, the tracker and checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import time
from dataclasses import asdict
from pathlib import Path

import optuna
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torchvision.utils import save_image
from tqdm import tqdm

from soda import dist
from soda.checkpoint import load_checkpoint, save_checkpoint
from soda.config import REPO_ROOT, Config, ViewConfig, to_settings
from soda.data import LabelledImages, ViewAugmentation, load_split
from soda.ema import SyncFreeEMA
from soda.errors import ConfigError, DivergenceError
from soda.eval import evaluate_probes, latent_errors, latent_gap
from soda.models import SODA, build_soda
from soda.sweep import TrialReporter, redact
from soda.tracking import Tracker, flatten, git_state

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoints/last.pt"
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
PRECISION_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> float | list[float] | None:
    """Train, evaluate and record one run; returns the metric named by `objective` (a list of
    them for a list) on global rank 0 and None on the other ranks. In a sweep's trial
    (`sweep.trial` set), each evaluation is reported to the Optuna trial, which may prune it."""
    settings = to_settings(cfg)
    run_dir = Path(run_dir) if run_dir is not None else _hydra_output_dir()
    device = _resolve_device(settings.device)
    world = dist.setup(use_cuda=device.type == "cuda")
    if world.enabled and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    if settings.schedule.batch_size % world.world_size:
        raise ConfigError(
            f"schedule.batch_size={settings.schedule.batch_size} is not divisible by the world size "
            f"{world.world_size} (nodes x tasks per node); choose a multiple of {world.world_size}"
        )

    # Everything that can be wrong is checked before any data is read or time is spent.
    torch.manual_seed(settings.seed)  # the same initial weights on every rank
    model = build_model(settings)
    tracker = None
    if world.is_main:
        tracking = {k: v for k, v in asdict(settings.tracking).items() if k != "name"}
        if settings.sweep.trial is not None and tracking["run_name"] is None:
            tracking["run_name"] = f"{settings.sweep.study_name}-trial-{settings.sweep.trial}"
        tracker = Tracker(**tracking)
    if tracker is not None:
        tracker.check()
    checkpoint_path = run_dir / CHECKPOINT
    signature = _signature(settings)
    resume = load_checkpoint(checkpoint_path, signature) if checkpoint_path.exists() else None

    train_set, test_set = load_data(settings)
    if settings.schedule.batch_size > len(train_set):
        raise ConfigError(
            f"schedule.batch_size={settings.schedule.batch_size} is larger than the training set "
            f"({len(train_set)} images); lower it"
        )

    reporter = None
    if world.is_main and settings.sweep.trial is not None and isinstance(settings.objective, str):
        reporter = TrialReporter(settings.sweep.storage, settings.sweep.study_name, settings.sweep.trial)
    trainer = Trainer(model, train_set, test_set, settings, run_dir, device, tracker, world, reporter)
    if resume is not None:
        trainer.load_state(resume)
        log.info("resuming from %s at epoch %d, step %d", checkpoint_path, trainer.epoch, trainer.step_in_epoch)

    if tracker is not None:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved.pop("hydra", None)
        resolved["sweep"]["storage"] = redact(str(resolved["sweep"]["storage"]))  # no passwords in MLflow
        tags = {
            **git_state(REPO_ROOT),
            "seed": str(settings.seed),
            "world_size": str(world.world_size),
            # Which process to look at (or stop) while the run is live.
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            **_trial_tags(settings),
        }
        params = flatten(resolved)
        params["model.encoder_parameters"] = str(sum(p.numel() for p in model.encoder.parameters()))
        params["model.decoder_parameters"] = str(sum(p.numel() for p in model.decoder.parameters()))
        tracker.start(run_dir, params, OmegaConf.to_yaml(resolved), tags)
    # SLURM's warning signal: submitit asks for USR2, a plain `sbatch --signal` often USR1.
    previous_handlers = {sig: signal.signal(sig, trainer.request_preemption) for sig in PREEMPTION_SIGNALS}
    try:
        metrics = trainer.fit()
    except Preempted as preempted:
        if tracker is not None:
            tracker.finish("KILLED", error=str(preempted))
        log.warning("%s", preempted)
        _hand_over_preemption(previous_handlers[trainer.preempt_signal], trainer.preempt_signal, world)
        raise SystemExit(str(preempted)) from None
    except KeyboardInterrupt:
        if tracker is not None:
            tracker.finish("KILLED", error="interrupted")
        raise
    except optuna.TrialPruned as pruned:
        # Stopped on purpose by the sweep's pruner: not a failure, and not a finished run.
        if tracker is not None:
            tracker.finish("KILLED", tags={"trial_state": "PRUNED", "pruned": str(pruned)})
        raise
    except BaseException as error:
        if tracker is not None:
            tracker.finish("FAILED", error=f"{type(error).__name__}: {error}")
        if world.enabled:
            # One rank failing must end the job now, not leave the others waiting in a
            # collective until a timeout: report and leave the process at once.
            log.exception("rank %d failed", world.rank)
            logging.shutdown()
            os._exit(1)
        raise
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    if tracker is None:
        return None
    # How the loss ran: a compile that fell back to eager trains at eager speed, so say so.
    tags = {
        "compile": trainer.compile_state,
        **({"trial_state": "COMPLETE"} if settings.sweep.trial is not None else {}),
    }
    tracker.finish("FINISHED", tags=tags)
    summary = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
    print(f"final {summary} (epoch {trainer.epoch}, mlflow run {tracker.run_id}, {run_dir})", flush=True)
    if isinstance(settings.objective, str):
        return metrics[settings.objective]
    return [metrics[name] for name in settings.objective]


def _trial_tags(settings: Config) -> dict[str, str]:
    """A sweep's trial: its Optuna study and number, and its MLflow parent (the sweep's run)."""
    sweep = settings.sweep
    if sweep.trial is None:
        return {}
    tags = {"trial": str(sweep.trial), "optuna_study": str(sweep.study_name)}
    if sweep.parent_run_id:
        tags["mlflow.parentRunId"] = sweep.parent_run_id
    return tags


class Preempted(Exception):
    """Raised by the loop after it saved a checkpoint because SIGUSR1 arrived."""


def _hand_over_preemption(previous_handler, signum: int, world: dist.Distributed) -> None:
    """After our checkpoint, let submitit do its part: on rank 0 it requeues the job and exits.
    The other ranks must not exit first (srun --kill-on-bad-exit would end rank 0 before it
    requeues), so under SLURM they wait for the requeue to stop them."""
    if not callable(previous_handler):
        return
    previous_handler(signum, None)
    if not world.is_main and "SLURM_JOB_ID" in os.environ:
        time.sleep(600)


def build_model(settings: Config) -> SODA:
    m, d = settings.model, settings.dataset
    try:
        return build_soda(
            arch=m.arch,
            latent_dim=m.latent_dim,
            small_images=m.small_images,
            image_size=d.image_size,
            base_channels=m.base_channels,
            channel_mults=tuple(m.channel_mults),
            attention_levels=tuple(m.attention_levels),
            blocks_per_level=m.blocks_per_level,
            attention_heads=m.attention_heads,
            dropout=m.dropout,
            layer_groups=m.layer_groups,
            norm_groups=m.norm_groups,
            schedule=m.noise_schedule,
            timesteps=m.timesteps,
            beta_start=m.beta_start,
            beta_end=m.beta_end,
            latent_drop_prob=m.latent_drop_prob,
            layer_mask_prob=m.layer_mask_prob,
            source_noise_std=m.source_noise_std,
            input_mean=tuple(d.mean),
            input_std=tuple(d.std),
        )
    except ValueError as error:
        raise ConfigError(f"model: {error}") from None


def load_data(settings: Config) -> tuple[LabelledImages, LabelledImages]:
    d = settings.dataset
    splits = []
    for split, size, limit in (("train", d.train_size, d.train_limit), ("test", d.test_size, d.test_limit)):
        data = load_split(
            d.name, d.root, split, d.image_size, d.num_classes, download=d.download, seed=settings.seed, size=size
        )
        splits.append(data.subset(limit))
    return splits[0], splits[1]


def view_augmentation(image_size: int, view: ViewConfig) -> ViewAugmentation:
    kwargs = asdict(view)
    kwargs.pop("name")
    return ViewAugmentation(image_size, **kwargs)


def _signature(settings: Config) -> dict:
    """What a checkpoint must share with the run resuming it."""
    d = settings.dataset
    return {
        **flatten(asdict(settings.model), "model."),
        "dataset.name": d.name,
        "dataset.image_size": str(d.image_size),
        "dataset.num_classes": str(d.num_classes),
        "seed": str(settings.seed),
    }


def _hydra_output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compile_loss(loss_fn, mode: str, device: torch.device):
    """torch.compile of the loss for `mode` ("auto": "default" on CUDA, eager elsewhere). Where
    compilation fails (no compiler, no Triton, an unsupported platform) the run goes on eager
    with a warning: the numbers are the same, only slower."""
    if mode == "auto":
        mode = "default" if device.type == "cuda" else "none"
    if mode == "none":
        return loss_fn
    try:
        compiled = torch.compile(loss_fn, mode=mode)
    except RuntimeError as error:  # e.g. a Python version torch.compile does not support
        log.warning("torch.compile unavailable (%s); training eager", error)
        return loss_fn
    return _EagerFallback(compiled, loss_fn)


class _EagerFallback:
    """Calls the compiled loss; if compiling it fails on the first call, warns once and uses the
    eager one from then on. Errors after a successful first call are real errors and propagate."""

    def __init__(self, compiled, eager):
        self.compiled, self.eager, self.checked = compiled, eager, False

    def __call__(self, *args):
        if self.checked:
            return self.compiled(*args)
        try:
            result = self.compiled(*args)
        except torch._dynamo.exc.TorchDynamoException as error:
            log.warning("torch.compile failed (%s); training eager", str(error).splitlines()[0][:300])
            self.compiled = self.eager
            result = self.eager(*args)
        self.checked = True
        return result


class Trainer:
    """The loop of SEED.md: AdamW, linear warm-up then constant lr, grad-norm clipping, EMA every
    step, mixed precision; probes on the EMA encoder every `eval.every` epochs and at the end."""

    def __init__(
        self,
        model: SODA,
        train_set: LabelledImages,
        test_set: LabelledImages,
        settings: Config,
        run_dir: Path,
        device: torch.device,
        tracker: Tracker | None,
        world: dist.Distributed | None = None,
        reporter: TrialReporter | None = None,
    ):
        s = settings.schedule
        self.reporter = reporter  # a sweep's trial on rank 0: reports each evaluation to Optuna
        self.settings = settings
        self.schedule = s
        self.run_dir = run_dir
        self.device = device
        self.tracker = tracker  # None on every rank but global rank 0
        self.world = world or dist.Distributed()
        if self.world.enabled and device.type == "cuda":
            # Batch statistics over the global batch; NCCL only (PyTorch's SyncBatchNorm needs a GPU).
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if device.type == "cuda":
            # Fixed shapes every step: let cuDNN pick its fastest convolution algorithms once.
            torch.backends.cudnn.benchmark = True
        channels_last = s.channels_last if s.channels_last is not None else device.type == "cpu"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format)
        # The loss goes through DDP when there are several ranks (gradients averaged across them).
        self.forward = self.model
        if self.world.enabled:
            self.forward = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.train_set = train_set
        self.test_set = test_set
        # The decoded data set sits on the training device; batches are indexed from it directly.
        self.train_images = train_set.images.to(device)
        size = settings.dataset.image_size
        self.source_augment = view_augmentation(size, settings.augmentation.source)
        self.target_augment = view_augmentation(size, settings.augmentation.target)
        self.same_view_settings = settings.augmentation.source == settings.augmentation.target

        decoder_lr = s.decoder_lr
        self.base_lrs = [decoder_lr * s.encoder_lr_ratio, decoder_lr]
        self.optimizer = torch.optim.AdamW(
            [{"params": model.encoder.parameters()}, {"params": model.decoder.parameters()}],
            lr=decoder_lr,
            betas=tuple(s.adam_betas),
            weight_decay=s.weight_decay,
            fused=device.type == "cuda",
        )
        self.autocast_dtype = PRECISION_DTYPES[s.precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=s.precision == "fp16")
        # Only rank 0 evaluates, so only rank 0 keeps the EMA copy.
        self.ema = None
        if self.world.is_main:
            self.ema = SyncFreeEMA(
                model,
                beta=s.ema_decay,
                update_after_step=0,
                update_every=s.ema_update_every,
                power=s.ema_warmup_power,
                include_online_model=False,
            )
        # The loss, compiled where that pays (see compile_loss); the EMA and the probes use the
        # plain modules, and checkpoints hold the plain state_dict.
        self.loss_fn = compile_loss(self.forward, s.compile, device)
        self.rank_batch = s.batch_size // self.world.world_size
        self.steps_per_epoch = len(train_set) // s.batch_size
        self.warmup_steps = max(1, round(s.warmup_epochs * self.steps_per_epoch))
        self.epoch = 0  # last completed epoch
        self.step_in_epoch = 0  # steps of epoch + 1 already done (a preempted epoch resumes there)
        self.global_step = 0
        self.metrics: dict[str, float] = {}
        # The training clock (schedule.train_seconds, eval.every_seconds): seconds spent in
        # training steps, from the end of this process's first step (which compiles), without
        # evaluations; it goes on across a resume.
        self.train_seconds = 0.0
        self.last_eval_seconds = 0.0
        self.first_step_done = False
        self.out_of_time = False
        self.preempt_requested = False
        self.preempt_signal = signal.SIGUSR1
        # Augmentation, timestep and noise draws differ per rank, seeded from the global rank.
        torch.manual_seed(settings.seed * 1_000 + self.world.rank)

    @property
    def compile_state(self) -> str:
        """eager (not asked for), compiled, or fallback (compiling failed: training ran eager)."""
        if not isinstance(self.loss_fn, _EagerFallback):
            return "eager"
        return "fallback" if self.loss_fn.compiled is self.loss_fn.eager else "compiled"

    def request_preemption(self, signum=signal.SIGUSR1, frame=None) -> None:
        """SIGUSR1/SIGUSR2 (SLURM's warning before a time limit or preemption): finish the
        current step, write a checkpoint, then stop; the requeued job resumes from it."""
        self.preempt_requested = True
        self.preempt_signal = signum

    # ----------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        s, e = self.schedule, self.settings.eval
        if self.epoch == 0 and self.step_in_epoch == 0 and e.at_start:
            self._evaluate_on_main(epoch=0, last=False)
        # A resumed time-boxed run that had spent its budget is finished (a larger budget goes on).
        self.out_of_time = self._spent(self.train_seconds)
        while self.epoch < s.epochs and not self.out_of_time:
            epoch = self.epoch + 1
            self.train_epoch(epoch)
            # A time-boxed run stops inside an epoch: that partial epoch counts as the last one.
            self.epoch, self.step_in_epoch = epoch, 0
            self.out_of_time = self._spent(self.train_seconds)
            last = epoch == s.epochs or self.out_of_time
            if last or epoch % e.every == 0 or self._evaluation_due():
                self._evaluate_on_main(epoch, last)
            if last or epoch % s.checkpoint_every == 0:
                self.save()
        if self.world.is_main and not self.metrics:  # resumed a run that had already finished
            raise ConfigError("this run directory holds a finished run without metrics; use a new run directory")
        return self.metrics

    def _spent(self, seconds: float) -> bool:
        """Has the training clock reached schedule.train_seconds (on any rank: all stop together)?"""
        budget = self.schedule.train_seconds
        return budget is not None and dist.any_rank(seconds >= budget, self.device)

    def _evaluation_due(self) -> bool:
        """eval.every_seconds of training since the last evaluation (on any rank)?"""
        every = self.settings.eval.every_seconds
        return every is not None and dist.any_rank(self.train_seconds - self.last_eval_seconds >= every, self.device)

    def _evaluate_on_main(self, epoch: int, last: bool) -> None:
        """Rank 0 evaluates; the others wait on a gloo barrier, which costs them nothing. The
        probes are cheap next to training, and a single process keeps them deterministic."""
        self.last_eval_seconds = self.train_seconds
        prune = False
        if self.world.is_main:
            self.evaluate(epoch, last)
            objective = self.settings.objective
            # The untrained encoder (epoch 0) is the same in every trial: reporting it would hand
            # each trial the same best value and hide its later ones from a median pruner.
            if self.reporter is not None and epoch > 0 and objective in self.metrics:
                prune = self.reporter.report(self.metrics[objective], epoch)
        dist.wait_for_all()
        if self.settings.sweep.trial is not None and dist.any_rank(prune, self.device):
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")

    def save(self) -> None:
        """Checkpoint on rank 0 (with every rank's RNG state); all ranks leave together."""
        rng_states = dist.gather_to_main(self._rng_state())
        if self.world.is_main:
            save_checkpoint(self.run_dir / CHECKPOINT, self.state_dict(rng_states))
        dist.wait_for_all()

    def train_epoch(self, epoch: int) -> None:
        s = self.schedule
        # One global order per epoch, the same on every rank; each rank takes its slice of each
        # global batch, so the global batch is the same whatever the number of ranks.
        order_rng = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train_set), generator=order_rng).to(self.device)
        offset = self.world.rank * self.rank_batch
        self.model.train()
        running, count = torch.zeros((), device=self.device), 0
        started, first = time.perf_counter(), self.step_in_epoch
        clock_at_start = self.train_seconds
        bar = tqdm(
            range(first, self.steps_per_epoch),
            desc=f"epoch {epoch}/{s.epochs}",
            leave=False,
            disable=None if self.world.is_main else True,
        )
        for index in bar:
            start = index * s.batch_size + offset
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
            if self.global_step % s.log_every == 0:
                # The only host sync of the loop, once every log_every steps.
                value = dist.all_mean(running / count).item()
                if not math.isfinite(value):
                    raise DivergenceError(
                        f"train/loss is {value} at step {self.global_step}; lower schedule.decoder_lr, "
                        f"keep schedule.grad_clip, or try schedule.precision=bf16"
                    )
                if self.tracker is not None:
                    self.tracker.log_metrics(
                        {"train/loss": value, "train/lr": self._lr_factor() * s.decoder_lr}, step=self.global_step
                    )
                bar.set_postfix(loss=f"{value:.4f}")
                running, count = torch.zeros((), device=self.device), 0
                if dist.any_rank(self.preempt_requested, self.device):
                    self.save()
                    raise Preempted(
                        f"preempted: checkpoint saved at epoch {epoch - 1} + {self.step_in_epoch} steps; "
                        "rerun the same command (or let SLURM requeue the job) to resume"
                    )
                if self._spent(self.train_seconds):
                    log.info("schedule.train_seconds=%s spent in epoch %d", s.train_seconds, epoch)
                    break
        _sync(self.device)
        seconds = time.perf_counter() - started
        self.train_seconds = clock_at_start + seconds
        steps = self.step_in_epoch - first
        throughput = steps * s.batch_size / seconds if steps and seconds > 0 else math.nan
        if self.tracker is not None and steps:
            self.tracker.log_metrics(
                {"train/epoch_seconds": seconds, "train/images_per_second": throughput}, step=epoch
            )
        log.info("epoch %d/%d  %.1f s  %.0f images/s", epoch, s.epochs, seconds, throughput)

    def _first_step_finished(self, seconds: float) -> None:
        """Record how long this process's first step took (compilation, cuDNN autotuning)."""
        self.first_step_done = True
        if self.tracker is not None:
            self.tracker.log_metrics({"train/first_step_seconds": seconds}, step=self.global_step)
        log.info("first step (compilation, warm-up) took %.1f s", seconds)

    def train_step(self, images: torch.Tensor) -> torch.Tensor:
        """One optimiser step on a uint8 batch [N, 3, H, W] already on the device."""
        source_view, target_view = self.make_views(images)
        return self.optimize(source_view, target_view)

    def make_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two independent augmentations of each image. With the same settings for both
        views, one call on the doubled batch does both: the draws are per image anyway, and
        half the calls is half the per-op overhead."""
        if self.same_view_settings:
            both = self.source_augment(torch.cat([images, images]))
            return both[: images.shape[0]], both[images.shape[0] :]
        return self.source_augment(images), self.target_augment(images)

    def optimize(self, source_view: torch.Tensor, target_view: torch.Tensor) -> torch.Tensor:
        """Loss, backward, clip, AdamW, EMA; returns the loss as a device tensor (no host sync:
        nothing here reads a value back, so the CPU can queue the next step at once)."""
        s = self.schedule
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

        # Clip and step.
        if s.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

        # Update EMA.
        if self.ema is not None:
            self.ema.update()
        self.global_step += 1
        return loss

    def _lr_factor(self) -> float:
        return min(1.0, (self.global_step + 1) / self.warmup_steps)

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, epoch: int, last: bool = True) -> dict[str, float]:
        """Probes, latent gap (and reconstructions) of the EMA model; the linear probe only at the
        `last` evaluation when eval.linear_probe=last. Runs under its own seeded RNG so that
        evaluating, or not, never changes the training that follows."""
        e = self.settings.eval
        ema_model: SODA = self.ema.ema_model
        ema_model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        started = time.perf_counter()
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.settings.seed * 7_919 + epoch)
            metrics = self._probe(ema_model, linear=last or e.linear_probe == "every")
            if e.latent_gap_images > 0:
                metrics.update(self._latent_gap(ema_model))
            if e.num_reconstructions > 0:
                metrics["eval/recon_mse"] = self._reconstruct(ema_model, epoch)
        metrics = {k: float(v) for k, v in metrics.items()}
        progress = {
            "eval/seconds": time.perf_counter() - started,
            # Progress in images and training seconds: comparable across batch sizes, GPU counts
            # and time-boxed runs.
            "train/images_seen": float(self.global_step * self.schedule.batch_size),
            "train/seconds": self.train_seconds,
        }
        self.tracker.log_metrics({**metrics, **progress}, step=epoch)
        shown = "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        log.info("eval epoch %d: %s", epoch, shown)
        self.metrics = metrics
        return metrics

    def _latent_gap(self, ema_model: SODA) -> dict[str, float]:
        """eval/latent_gap on a fixed test batch with fixed noise (the same at every evaluation),
        and the gap at each timestep."""
        e = self.settings.eval
        images = self.test_set.images[: e.latent_gap_images].to(self.device).float() / 255
        errors = latent_errors(ema_model, images, e.latent_gap_timesteps, seed=self.settings.seed)
        gaps = {f"eval/latent_gap_t{step}": latent_gap({step: errors[step]}) for step in errors}
        return {"eval/latent_gap": latent_gap(errors), **gaps}

    def _probe(self, ema_model: SODA, linear: bool = True) -> dict[str, float]:
        e = self.settings.eval
        autocast = self.autocast_dtype if self.device.type == "cuda" else None

        def encode(images: torch.Tensor) -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
                return ema_model.encode(images.to(self.device).float() / 255, normalize=True)

        def batches(data: LabelledImages, augment: ViewAugmentation | None = None):
            for start in range(0, len(data), e.batch_size):
                images = data.images[start : start + e.batch_size].to(self.device)
                if augment is not None:
                    images = (augment(images) * 255).round().to(torch.uint8)
                yield images, data.labels[start : start + e.batch_size]

        probe_augment = view_augmentation(self.settings.dataset.image_size, e.probe_augmentation)
        result = evaluate_probes(
            encode,
            batches(self.train_set),
            batches(self.test_set),
            self.settings.dataset.num_classes,
            knn_k=min(e.knn_k, len(self.train_set)),
            knn_vote=e.knn_vote,
            knn_temperature=e.knn_temperature,
            probe_epochs=e.probe_epochs,
            probe_lr=e.probe_lr,
            probe_batch_size=e.probe_batch_size,
            probe_augmented_batches=[batches(self.train_set, probe_augment) for _ in range(e.probe_augmented_copies)],
            seed=self.settings.seed,
            device=self.device,
            linear=linear,
        )
        return {f"eval/{name}": value for name, value in result.items()}

    def _reconstruct(self, ema_model: SODA, epoch: int) -> float:
        e = self.settings.eval
        originals = self.test_set.images[: e.num_reconstructions].to(self.device).float() / 255
        generator = torch.Generator(device=self.device).manual_seed(self.settings.seed)
        reconstructions = ema_model.reconstruct(
            originals, steps=e.sample_steps, eta=e.sample_eta, guidance=e.guidance, generator=generator
        )
        path = self.run_dir / "samples" / f"reconstructions_epoch{epoch:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Top row: test images; bottom row: their reconstructions from the latent alone.
        save_image(torch.cat([originals, reconstructions]).cpu(), path, nrow=len(originals), padding=1)
        self.tracker.log_artifact(path, "samples")
        return torch.mean((reconstructions - originals) ** 2).item()

    # ----------------------------------------------------------------------------------------
    def _rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def state_dict(self, rng_states: list[dict]) -> dict:
        return {
            "signature": _signature(self.settings),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_states,  # one entry per rank
            "metrics": self.metrics,
            "train_seconds": self.train_seconds,
            "last_eval_seconds": self.last_eval_seconds,
            "mlflow_run_id": self.tracker.run_id or "",
        }

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        rng_states = state["rng"]
        if len(rng_states) == self.world.world_size:
            mine = rng_states[self.world.rank]
            torch.set_rng_state(mine["torch"])
            if self.device.type == "cuda" and "cuda" in mine:
                torch.cuda.set_rng_state(mine["cuda"], self.device)
        else:
            log.warning(
                "checkpoint has %d RNG states for %d ranks: resuming with fresh per-rank seeds, "
                "so the run will not repeat an uninterrupted one bit for bit",
                len(rng_states),
                self.world.world_size,
            )
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.metrics = dict(state["metrics"])
        # Checkpoints written before the training clock existed have none of it.
        self.train_seconds = state.get("train_seconds", 0.0)
        self.last_eval_seconds = state.get("last_eval_seconds", 0.0)
