"""The training loop on plain values: no config, no tracker, no sweep; what it tells the outside."""

import subprocess
import sys

import pytest
import torch

from soda import tracking
from soda.data import LabelledImages
from soda.loop import CHECKPOINT, StopRequested, Trainer
from tests.helpers import REPO, reference_view
from tests.models.helpers import tiny_soda

SCHEDULE = dict(
    epochs=3,
    warmup_epochs=1,
    batch_size=8,
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
    checkpoint_every=2,
    log_every=1,
    train_seconds=None,
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


def _trainer(tmp_path, evaluate, on_evaluation=None, tracker=None, **schedule):
    torch.manual_seed(0)
    return Trainer(
        tiny_soda(),
        _images(),
        tmp_path,
        torch.device("cpu"),
        source_augment=reference_view(8, crop_prob=0.5, randaugment_prob=0.0),
        target_augment=None,
        evaluate=evaluate,
        on_evaluation=on_evaluation,
        tracker=tracker,
        signature={"model": "tiny"},
        eval_every=2,
        eval_every_seconds=None,
        **{"eval_at_start": True, **SCHEDULE, **schedule},
    )


def test_each_evaluation_reaches_on_evaluation_with_its_progress(tmp_path):
    seen, evaluated = [], []

    def evaluate(ema_model, epoch, last):
        assert ema_model is trainer.ema.ema_model  # the EMA copy, not the trained weights
        evaluated.append((epoch, last))
        return {tracking.KNN_ACC: epoch / 10}

    def on_evaluation(epoch, metrics):
        seen.append((epoch, metrics))
        return False

    trainer = _trainer(tmp_path, evaluate, on_evaluation)
    metrics = trainer.fit()

    # At the start, every eval_every=2 epochs, and at the last epoch (3).
    assert evaluated == [(0, False), (2, False), (3, True)]
    assert metrics == {tracking.KNN_ACC: 0.3}  # the last evaluation, without the progress keys
    assert [epoch for epoch, _ in seen] == [0, 2, 3]
    steps_per_epoch = 24 // 8
    for epoch, reported in seen:
        assert reported[tracking.KNN_ACC] == epoch / 10
        assert reported[tracking.IMAGES_SEEN] == epoch * steps_per_epoch * 8
        assert reported[tracking.EVAL_SECONDS] >= 0 and tracking.TRAIN_SECONDS in reported
    # Checkpoints every 2 epochs and at the end: the last one is epoch 3's, with what it needs.
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["epoch"] == 3 and state["global_step"] == 9 and state["mlflow_run_id"] == ""
    assert state["signature"] == {"model": "tiny"} and state["metrics"] == metrics


def test_on_evaluation_asking_to_stop_ends_the_run_before_it_trains_on(tmp_path):
    trainer = _trainer(tmp_path, lambda model, epoch, last: {tracking.KNN_ACC: 0.5}, lambda epoch, m: epoch == 2)
    with pytest.raises(StopRequested, match="pruned at epoch 2"):
        trainer.fit()
    assert trainer.epoch == 2 and trainer.global_step == 6


def test_training_metrics_go_to_the_tracker_by_their_contract_keys(tmp_path):
    recorder = Recorder()
    evaluate = lambda model, epoch, last: {tracking.KNN_ACC: 0.5}  # noqa: E731
    _trainer(tmp_path, evaluate, tracker=recorder, epochs=1, eval_at_start=False).fit()
    keys = {key for _, metrics in recorder.points for key in metrics}
    assert {tracking.TRAIN_LOSS, tracking.TRAIN_LR, tracking.FIRST_STEP_SECONDS} <= keys
    assert {tracking.EPOCH_SECONDS, tracking.IMAGES_PER_SECOND} <= keys
    losses = [(step, m[tracking.TRAIN_LOSS]) for step, m in recorder.points if tracking.TRAIN_LOSS in m]
    assert [step for step, _ in losses] == [1, 2, 3] and all(value > 0 for _, value in losses)
    # Warm-up over one epoch (3 steps): the learning rate rises linearly to decoder_lr.
    rates = [m[tracking.TRAIN_LR] for _, m in recorder.points if tracking.TRAIN_LR in m]
    assert rates == pytest.approx([1e-3 * 2 / 3, 1e-3, 1e-3])
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["mlflow_run_id"] == "run-1"


def test_the_loop_module_imports_no_config_or_sweep_library():
    """The loop takes plain values: importing it must not pull in Hydra, OmegaConf or Optuna."""
    code = (
        "import sys, soda.loop; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'hydra', 'omegaconf', 'optuna'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
