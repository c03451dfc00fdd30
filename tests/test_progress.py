"""soda.progress: the time left that an epoch line shows, the stage lines of an evaluation, and
the result file a finished run leaves for its launcher."""

from __future__ import annotations

import logging

import pytest
import torch

from soda import progress
from soda.eval import evaluate_probes, latent_errors
from tests.models.helpers import tiny_soda


@pytest.mark.parametrize(
    "seconds, shown",
    [
        (0, "0s"),
        (41.4, "41s"),
        (59.6, "1m00s"),
        (192, "3m12s"),
        (9 * 3600 + 5 * 60 + 20, "9h05m"),
        (2 * 86400 + 3 * 3600, "2d03h"),
    ],
)
def test_durations_read_as_a_person_writes_them(seconds, shown):
    assert progress.duration(seconds) == shown


def _simulated_seconds_left(epoch, epochs, epoch_s, eval_s, save_s, eval_every, checkpoint_every, seconds_left):
    """The loop of soda.loop.Trainer.fit played epoch by epoch: this epoch's evaluation and
    checkpoint (when due), then each further epoch's training, until the last epoch or the
    training clock's budget ends the run."""
    total, clock_left = 0.0, seconds_left
    while True:
        last = epoch == epochs or (clock_left is not None and clock_left <= 0)
        total += eval_s * (epoch % eval_every == 0 or last) + save_s * (epoch % checkpoint_every == 0 or last)
        if last:
            return total
        epoch += 1
        trained = epoch_s if clock_left is None else min(epoch_s, clock_left)
        total += trained
        clock_left = None if clock_left is None else clock_left - trained


@pytest.mark.parametrize("epoch", [1, 2, 3, 7, 10])
@pytest.mark.parametrize("eval_every, checkpoint_every", [(1, 1), (2, 5), (3, 4), (100, 100)])
@pytest.mark.parametrize("seconds_left", [None, 0.0, 7.0, 20.0, 1e6])
def test_the_time_left_counts_epochs_evaluations_and_checkpoints_as_the_loop_runs_them(
    epoch, eval_every, checkpoint_every, seconds_left
):
    expected = _simulated_seconds_left(epoch, 10, 2.0, 30.0, 0.5, eval_every, checkpoint_every, seconds_left)
    seconds, budget_ends_it = progress.eta_seconds(
        epoch=epoch,
        epochs=10,
        epoch_seconds=2.0,
        eval_seconds=30.0,
        save_seconds=0.5,
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
        seconds_left=seconds_left,
    )
    assert seconds == pytest.approx(expected)
    assert budget_ends_it == (seconds_left is not None and seconds_left < (10 - epoch) * 2.0)


def test_evaluations_due_by_the_training_clock_add_to_those_due_by_epoch():
    seconds, _ = progress.eta_seconds(
        epoch=1,
        epochs=10,
        epoch_seconds=10.0,
        eval_seconds=5.0,
        save_seconds=0.0,
        eval_every=100,
        checkpoint_every=100,
        eval_every_seconds=25.0,
    )
    # 90 s of training; the last epoch's evaluation and three more by the clock (every 25 s).
    assert seconds == pytest.approx(90 + 4 * 5)


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    return clock


def _messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "test.progress"]


def test_a_stage_says_when_it_begins_and_then_at_most_once_every_ten_seconds(caplog, clock):
    caplog.set_level(logging.INFO)
    logger = logging.getLogger("test.progress")
    with progress.narrate("eval epoch 4", logger):
        progress.stage("k-NN features", 60000, "images")
        for done in range(1000, 60001, 1000):  # a batch every 0.5 s
            clock.now += 0.5
            progress.advance(done)
        clock.now += 1.0
        progress.stage("linear probe", 15, "epochs")
        assert progress.elapsed() == pytest.approx(31.0)
    assert _messages(caplog) == [
        "eval epoch 4: k-NN features 0/60000 images  0.0 s",
        "eval epoch 4: k-NN features 20000/60000 images  10.0 s",
        "eval epoch 4: k-NN features 40000/60000 images  20.0 s",
        "eval epoch 4: k-NN features 60000/60000 images  30.0 s",
        "eval epoch 4: linear probe 0/15 epochs  31.0 s",
    ]


def test_stage_lines_are_silent_outside_an_evaluation(caplog):
    caplog.set_level(logging.DEBUG)
    progress.stage("k-NN features", 10, "images")
    progress.advance(10)
    assert caplog.records == [] and progress.elapsed() is None


def test_an_evaluation_names_each_of_its_stages_in_order(caplog):
    caplog.set_level(logging.INFO)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(40, 5, generator=generator)
    labels = torch.arange(40) % 2

    def batches():
        for start in range(0, 40, 10):
            yield images[start : start + 10], labels[start : start + 10]

    def encode(batch):
        return torch.nn.functional.normalize(batch, dim=1)

    model = tiny_soda().eval()
    with progress.narrate("eval epoch 2", logging.getLogger("test.progress")):
        evaluate_probes(encode, batches(), batches(), 2, knn_k=3, probe_epochs=2, train_count=40, test_count=40)
        latent_errors(model, torch.rand(4, 3, 8, 8), [10, 50])
    stages = [message.split("  ")[0] for message in _messages(caplog)]
    assert stages == [
        "eval epoch 2: k-NN features 0/40 images",
        "eval epoch 2: linear probe 0/2 epochs",
        "eval epoch 2: k-NN and linear test 0/40 images",
        "eval epoch 2: latent gap 0/2 timesteps",
    ]


def test_a_result_reads_back_as_written_and_a_missing_or_broken_one_as_none(tmp_path):
    result = {"epoch": 3, "metrics": {"eval/knn_acc": 0.5}, "objective": {"eval/knn_acc": 0.5}}
    progress.write_result(tmp_path, result)
    assert progress.read_result(tmp_path) == result
    assert progress.read_result(tmp_path / "nowhere") is None
    (tmp_path / progress.RESULT_FILE).write_text('{"epoch": ')
    assert progress.read_result(tmp_path) is None
