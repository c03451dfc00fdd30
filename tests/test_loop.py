"""The training loop on plain values: no config, no tracker, no sweep; what it tells the outside."""

import logging
import re
import subprocess
import sys
import time

import pytest
import torch

from soda.checkpoint import rng_state
from soda.data import LabelledImages
from soda.errors import DivergenceError
from soda.loop import CHECKPOINT, StopRequested, Trainer
from soda.record import (
    DECODER_GRAD_NORM,
    DIAGNOSTICS,
    ENCODER_GRAD_NORM,
    EPOCH_SECONDS,
    EVAL_SECONDS,
    FIRST_STEP_SECONDS,
    IMAGES_PER_SECOND,
    IMAGES_SEEN,
    KNN_ACC,
    LATENT_NORM,
    LATENT_RANK,
    LATENT_STD,
    MODULATION_STD,
    TRAIN_LOSS,
    TRAIN_LR,
    TRAIN_SECONDS,
)
from soda.trainer_parts import Hooks, Optimization, Schedule, Views
from tests.helpers import REPO, reference_view
from tests.models.helpers import tiny_soda

OPTIMIZATION = dict(
    decoder_lr=1e-3,
    encoder_lr_ratio=2.0,
    weight_decay=0.05,
    adam_betas=(0.9, 0.95),
    grad_clip=1.0,
    ema_decay=0.999,
    ema_update_every=1,
    ema_warmup_power=0.67,
    precision="fp32",
    compile="none",
    channels_last=None,
)
SCHEDULE = dict(
    epochs=3,
    warmup_epochs=1,
    batch_size=8,
    checkpoint_every=2,
    log_every=1,
    train_seconds=None,
    eval_every=2,
    eval_every_seconds=None,
    eval_at_start=True,
)


def _images(count: int = 24) -> LabelledImages:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 8, 8), generator=generator, dtype=torch.uint8)
    return LabelledImages(images, torch.arange(count) % 2, ["a", "b"])


class Recorder:
    """A tracker that keeps what it is told."""

    run_id = "run-1"

    def __init__(self):
        self.points: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.points.append((step, dict(metrics)))


def _trainer(tmp_path, evaluate, on_evaluation=None, tracker=None, **changes):
    """A Trainer of the tiny model on 24 random images; `changes` to its OPTIMIZATION or SCHEDULE."""
    unknown = set(changes) - set(OPTIMIZATION) - set(SCHEDULE)
    assert not unknown, f"neither an optimisation nor a schedule setting: {unknown}"
    torch.manual_seed(0)
    return Trainer(
        tiny_soda(),
        Views(_images(), source_augment=reference_view(8, crop_prob=0.5, randaugment_prob=0.0), target_augment=None),
        Optimization(**{**OPTIMIZATION, **{k: v for k, v in changes.items() if k in OPTIMIZATION}}),
        Schedule(**{**SCHEDULE, **{k: v for k, v in changes.items() if k in SCHEDULE}}),
        Hooks(evaluate, on_evaluation, tracker),
        run_dir=tmp_path,
        device=torch.device("cpu"),
        signature={"model": "tiny"},
    )


def test_each_evaluation_reaches_on_evaluation_with_its_progress(tmp_path):
    seen, evaluated = [], []

    def evaluate(ema_model, epoch, last):
        assert ema_model is trainer.ema.ema_model  # the EMA copy, not the trained weights
        evaluated.append((epoch, last))
        return {KNN_ACC: epoch / 10}

    def on_evaluation(epoch, metrics):
        seen.append((epoch, metrics))
        return False

    trainer = _trainer(tmp_path, evaluate, on_evaluation)
    metrics = trainer.fit()

    # At the start, every eval_every=2 epochs, and at the last epoch (3).
    assert evaluated == [(0, False), (2, False), (3, True)]
    assert metrics == {KNN_ACC: 0.3}  # the last evaluation, without the progress keys
    assert [epoch for epoch, _ in seen] == [0, 2, 3]
    steps_per_epoch = 24 // 8
    for epoch, reported in seen:
        assert reported[KNN_ACC] == epoch / 10
        assert reported[IMAGES_SEEN] == epoch * steps_per_epoch * 8
        assert reported[EVAL_SECONDS] >= 0 and TRAIN_SECONDS in reported
    # Checkpoints every 2 epochs and at the end: the last one is epoch 3's, with what it needs.
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["epoch"] == 3 and state["global_step"] == 9 and state["mlflow_run_id"] == ""
    assert state["signature"] == {"model": "tiny"} and state["metrics"] == metrics


def test_on_evaluation_asking_to_stop_ends_the_run_before_it_trains_on(tmp_path):
    trainer = _trainer(tmp_path, lambda model, epoch, last: {KNN_ACC: 0.5}, lambda epoch, m: epoch == 2)
    with pytest.raises(StopRequested, match="pruned at epoch 2"):
        trainer.fit()
    assert trainer.epoch == 2 and trainer.global_step == 6


def test_training_metrics_go_to_the_tracker_by_their_contract_keys(tmp_path):
    recorder = Recorder()

    def evaluate(model, epoch, last):
        return {KNN_ACC: 0.5}

    _trainer(tmp_path, evaluate, tracker=recorder, epochs=1, eval_at_start=False).fit()
    keys = {key for _, metrics in recorder.points for key in metrics}
    assert {TRAIN_LOSS, TRAIN_LR, FIRST_STEP_SECONDS} <= keys
    assert {EPOCH_SECONDS, IMAGES_PER_SECOND} <= keys
    losses = [(step, m[TRAIN_LOSS]) for step, m in recorder.points if TRAIN_LOSS in m]
    assert [step for step, _ in losses] == [1, 2, 3] and all(value > 0 for _, value in losses)
    # Warm-up over one epoch (3 steps): the learning rate rises linearly to decoder_lr.
    rates = [m[TRAIN_LR] for _, m in recorder.points if TRAIN_LR in m]
    assert rates == pytest.approx([1e-3 * 2 / 3, 1e-3, 1e-3])
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["mlflow_run_id"] == "run-1"


def _loss_turns_nan_at(trainer: Trainer, step: int) -> None:
    """From optimiser step `step` (counted from 1, as the tracker counts them) on, the loss is NaN
    and so are the gradients: the weights go NaN the way a real divergence takes them."""
    loss_fn = trainer.loss_fn

    def poisoned(source_view, target_view):
        loss = loss_fn(source_view, target_view)
        return loss * float("nan") if trainer.global_step + 1 >= step else loss

    trainer.loss_fn = poisoned


def _gradient_turns_inf_at(trainer: Trainer, step: int, then=lambda: None) -> None:
    """At optimiser step `step` one gradient is infinite while the loss stays finite; `then` runs
    during that step's backward pass."""

    def hook(grad):
        if trainer.global_step + 1 != step:
            return grad
        then()
        return torch.full_like(grad, float("inf"))

    next(trainer.model.decoder.parameters()).register_hook(hook)


def _finite(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def test_a_loss_that_turns_nan_between_log_points_fails_the_run_before_it_leaves_a_trace(tmp_path):
    """An epoch of 3 steps and log_every=100: no log point ever comes. The NaN of step 5 must
    still stop the run before the NaN model is evaluated or overwrites epoch 1's checkpoint."""
    evaluated = []

    def evaluate(ema_model, epoch, last):
        evaluated.append(epoch)
        return {KNN_ACC: 0.5}

    trainer = _trainer(tmp_path, evaluate, log_every=100, checkpoint_every=1, eval_every=1)
    trainer.epochs = 1
    trainer.fit()  # epoch 1 trains, is evaluated and checkpointed while the loss is finite
    checkpoint = tmp_path / CHECKPOINT
    good_bytes, good_mtime = checkpoint.read_bytes(), checkpoint.stat().st_mtime_ns
    assert evaluated == [0, 1] and trainer.global_step == 3

    trainer.epochs = 3
    _loss_turns_nan_at(trainer, step=5)  # epoch 2's second step, not a log point
    with pytest.raises(DivergenceError, match=r"^train/loss is nan at step 5; lower schedule\.decoder_lr"):
        trainer.fit()
    assert not _finite(trainer.model)  # the run did diverge (the test poisons for real)
    assert evaluated == [0, 1]  # epoch 2's NaN model never reached the probes
    assert checkpoint.read_bytes() == good_bytes and checkpoint.stat().st_mtime_ns == good_mtime


def test_a_diverged_run_asked_to_preempt_writes_no_checkpoint(tmp_path):
    """Step 2's gradient is infinite with a finite loss, and SIGUSR1 arrives during that step:
    clipping then AdamW make the weights NaN, and the preemption checkpoint must not hold them."""
    trainer = _trainer(tmp_path, lambda model, epoch, last: {KNN_ACC: 0.5}, eval_at_start=False)
    _gradient_turns_inf_at(trainer, step=2, then=trainer.request_preemption)
    with pytest.raises(DivergenceError, match=r"^the gradient norm is inf at step 2 \(train/loss [0-9.]+\)"):
        trainer.fit()
    assert not _finite(trainer.model)
    assert not (tmp_path / CHECKPOINT).exists()
    # The check sits in save() itself, ahead of writing, for any other caller.
    with pytest.raises(DivergenceError, match="at step 2"):
        trainer.save()
    assert not (tmp_path / CHECKPOINT).exists()


def test_under_fp16_an_infinite_gradient_is_the_scalers_to_skip_not_a_divergence(tmp_path):
    """The GradScaler skips a step whose gradients overflow and lowers its scale: the weights
    stay finite and the run goes on."""
    trainer = _trainer(
        tmp_path, lambda model, epoch, last: {KNN_ACC: 0.5}, epochs=1, eval_at_start=False, precision="fp16"
    )
    scale = trainer.scaler.get_scale()
    _gradient_turns_inf_at(trainer, step=2)
    assert trainer.fit() == {KNN_ACC: 0.5}
    assert trainer.scaler.get_scale() < scale and _finite(trainer.model)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["global_step"] == 3


def test_the_divergence_watch_leaves_a_healthy_run_bit_for_bit_unchanged(tmp_path):
    """The watch only reads the loss and the gradient norm: no random draws, nothing the model or
    the optimiser sees. The same run without it ends on the same weights, EMA and RNG state."""

    def evaluate(model, epoch, last):
        return {KNN_ACC: 0.5}

    watched = _trainer(tmp_path / "watched", evaluate, epochs=1, eval_at_start=False)
    watched.fit()
    watched_rng = rng_state(watched.device)["torch"]
    unwatched = _trainer(tmp_path / "unwatched", evaluate, epochs=1, eval_at_start=False)
    folded = []
    unwatched.divergence.fold = lambda step, loss, grad_norm: folded.append(step)  # the watch sees nothing
    unwatched.fit()
    assert folded  # the watch was off in this run: each step went to the no-op instead
    for module in ("model", "ema"):
        first, second = getattr(watched, module).state_dict(), getattr(unwatched, module).state_dict()
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first), module
    assert torch.equal(watched_rng, rng_state(unwatched.device)["torch"])


def test_log_points_carry_the_learning_diagnostics(tmp_path):
    recorder = Recorder()
    trainer = _trainer(
        tmp_path, lambda model, epoch, last: {KNN_ACC: 0.5}, tracker=recorder, epochs=1, eval_at_start=False
    )
    trainer.fit()
    logged = [m for _, m in recorder.points if TRAIN_LOSS in m]
    assert len(logged) == 3 and all(set(DIAGNOSTICS) <= set(m) for m in logged)
    for m in logged:
        assert m[ENCODER_GRAD_NORM] > 0 and m[DECODER_GRAD_NORM] > 0
        assert m[LATENT_NORM] > 0 and m[LATENT_STD] > 0 and m[MODULATION_STD] > 0
        assert 1 <= m[LATENT_RANK] <= trainer.batch_size
    # The latent diagnostics are of the latent as the evaluation sees it: the encoder in eval mode.
    images = trainer.train_images[:8].float() / 255
    trainer.model.eval()
    latent = trainer.model.encode(images, normalize=False)
    assert trainer.model.decoder.modulation_spread(latent[:1].expand(8, -1)) == 0  # one latent for all
    assert trainer.model.decoder.modulation_spread(latent) > 0


def test_an_encoder_cut_off_from_the_loss_shows_as_a_zero_gradient_norm(tmp_path):
    recorder = Recorder()
    trainer = _trainer(
        tmp_path, lambda model, epoch, last: {KNN_ACC: 0.5}, tracker=recorder, epochs=1, eval_at_start=False
    )
    encode = trainer.model.encoder.forward
    trainer.model.encoder.forward = lambda x: encode(x).detach()
    trainer.fit()
    norms = [m[ENCODER_GRAD_NORM] for _, m in recorder.points if ENCODER_GRAD_NORM in m]
    assert norms == [0.0, 0.0, 0.0]


def test_the_diagnostics_leave_training_bit_for_bit_unchanged(tmp_path):
    """An eval-mode encoder pass and gradient norms: no random draws, BatchNorm's statistics
    untouched. A run with a log point at every step ends where one without any does."""
    evaluate = lambda model, epoch, last: {KNN_ACC: 0.5}  # noqa: E731
    diagnosed = _trainer(tmp_path / "diagnosed", evaluate, epochs=2, eval_at_start=False, log_every=1)
    diagnosed.fit()
    plain = _trainer(tmp_path / "plain", evaluate, epochs=2, eval_at_start=False, log_every=1000)
    plain.fit()
    for module in ("model", "ema"):
        first, second = getattr(diagnosed, module).state_dict(), getattr(plain, module).state_dict()
        assert all(torch.equal(first[key], second[key]) for key in first), module


@pytest.mark.integration  # a process of its own
def test_the_loop_module_imports_no_config_or_sweep_library():
    """The loop takes plain values: importing it must not pull in Hydra, OmegaConf or Optuna."""
    code = (
        "import sys, soda.loop; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'hydra', 'omegaconf', 'optuna'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_each_epoch_line_shows_the_time_left_and_an_evaluation_says_what_it_is_doing(tmp_path, caplog):
    from soda import progress

    def evaluate(ema_model, epoch, last):
        progress.stage("k-NN features", 24, "images")
        return {KNN_ACC: 0.5}

    caplog.set_level(logging.INFO, logger="soda.loop")
    _trainer(tmp_path, evaluate).fit()
    messages = [record.getMessage() for record in caplog.records if record.name == "soda.loop"]
    epochs = [
        re.fullmatch(r"epoch (\d)/3  [\d.]+ s  \d+ images/s  eta (\d+)s", m) for m in messages if m.startswith("epoch")
    ]
    assert [int(match[1]) for match in epochs if match] == [1, 2, 3], messages
    stages = [m for m in messages if re.fullmatch(r"eval epoch \d: k-NN features 0/24 images  [\d.]+ s", m)]
    results = [m for m in messages if re.fullmatch(r"eval epoch \d: eval/knn_acc=0\.5000  \([\d.]+ s\)", m)]
    assert len(stages) == len(results) == 3  # epochs 0, 2 and 3


def test_the_time_left_is_the_recent_pace_over_the_epochs_evaluations_and_checkpoints_to_come(tmp_path):
    trainer = _trainer(tmp_path, lambda model, epoch, last: {KNN_ACC: 0.5})  # 3 epochs, eval and checkpoint every 2
    trainer.recent_seconds = {"epoch": [9.0, 11.0], "eval": [5.0], "save": [1.0]}
    # After epoch 1: two epochs of 10 s, evaluations and checkpoints at epochs 2 and 3.
    assert trainer._eta(1) == "eta 32s"
    trainer.train_budget, trainer.train_seconds = 20.0, 5.0  # 15 s of training left: the same epochs
    assert trainer._eta(1) == "eta 27s (schedule.train_seconds)"
    assert trainer._eta(3) == "eta 6s"  # the last epoch's evaluation and checkpoint


def test_on_pace_hears_once_how_long_the_training_left_takes(tmp_path):
    heard = []
    trainer = _trainer(tmp_path, lambda ema_model, epoch, last: {KNN_ACC: 0.0})
    trainer.on_pace = heard.append
    started = time.perf_counter()
    trainer.fit()
    took = time.perf_counter() - started
    # Timed on epoch 1's steps after the first (3 an epoch: 2 timed), for the 6 steps left of 9.
    (seconds,) = heard
    assert 0 < seconds < took and trainer.on_pace is None


def test_a_run_put_on_cpus_by_device_auto_is_warned_about_when_it_is_long(caplog):
    from soda.train import CPU_WARNING_S, cpu_pace_warning

    with caplog.at_level("WARNING", logger="soda.train"):
        cpu_pace_warning(None)(CPU_WARNING_S - 1)  # a short run: nothing to say
        assert caplog.records == []
        cpu_pace_warning(None)(2 * 3600 + 5 * 60)
        cpu_pace_warning("model soda_r18_ddpm (128 channels), 800 epochs of cifar10 at batch 512")(60)
    assert [record.getMessage() for record in caplog.records] == [
        "device=auto found no GPU (torch.cuda.is_available() is false), so this run trains on CPUs: about 2h05m "
        "more at the pace of its first steps; run it where a GPU is visible, or set device=cpu to train here "
        "without this warning",
        "device=auto found no GPU (torch.cuda.is_available() is false), so this run (model soda_r18_ddpm (128 "
        "channels), 800 epochs of cifar10 at batch 512) trains on CPUs: about 1m00s more at the pace of its first "
        "steps; run it where a GPU is visible, or set device=cpu to train here without this warning",
    ]


def test_gpu_sized_runs_are_the_reference_sized_ones():
    from soda.config import compose_config, gpu_sized, to_settings

    reference = to_settings(compose_config([]))
    assert gpu_sized(reference) == "model soda_r18_ddpm (128 channels), 800 epochs of cifar10 at batch 512"
    assert gpu_sized(to_settings(compose_config(["experiment=demo"]))) is None
    assert gpu_sized(to_settings(compose_config(["schedule.train_seconds=600"]))) is None
