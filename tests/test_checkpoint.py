import pytest
import torch

from soda.checkpoint import load_checkpoint, save_checkpoint
from soda.errors import CheckpointError
from tests.helpers import file_size_limit

SIGNATURE = {"model.arch": "resnet18", "seed": "0"}


class _Unpicklable:
    """Fails half-way through a torch.save, like a full disk would."""

    def __reduce__(self):
        raise RuntimeError("this object refuses to be pickled")


def test_round_trip_keeps_tensors_and_counters(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, {"signature": SIGNATURE, "epoch": 3, "weights": torch.arange(5.0)})
    state = load_checkpoint(path, SIGNATURE)
    assert state["epoch"] == 3 and torch.equal(state["weights"], torch.arange(5.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary files left


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"signature": SIGNATURE, "epoch": 1})
    with pytest.raises(RuntimeError, match="refuses to be pickled"):
        save_checkpoint(path, {"signature": SIGNATURE, "epoch": 2, "bad": _Unpicklable()})
    assert load_checkpoint(path, SIGNATURE)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"signature": SIGNATURE, "epoch": 1, "weights": torch.randn(1000)})
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"unreadable \(truncated or corrupt"):
        load_checkpoint(path, SIGNATURE)


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"signature": SIGNATURE, "epoch": 1})
    with pytest.raises(CheckpointError, match=r"other settings \(model.arch: 'resnet18' -> 'resnet50'\)"):
        load_checkpoint(path, {**SIGNATURE, "model.arch": "resnet50"})


def test_a_file_that_is_not_a_soda_checkpoint_is_refused(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"something": 1}, path)
    with pytest.raises(CheckpointError, match=r"not a SODA checkpoint"):
        load_checkpoint(path, SIGNATURE)


def test_a_write_the_system_refuses_is_one_line_naming_the_reason_and_the_old_checkpoint_survives(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"signature": SIGNATURE, "epoch": 1, "weights": torch.zeros(1000)})
    with pytest.raises(CheckpointError) as refused, file_size_limit(200_000):
        save_checkpoint(path, {"signature": SIGNATURE, "epoch": 2, "weights": torch.zeros(1_000_000)})
    message = str(refused.value)
    # torch.save itself reports only "unexpected pos ..." here; the real reason must come through.
    assert "File too large (errno 27)" in message and "about 4 MiB" in message, message
    assert "the previous checkpoint is unchanged" in message and "\n" not in message
    assert load_checkpoint(path, SIGNATURE)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_refused_first_write_says_no_checkpoint_was_written(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint was written"), file_size_limit(10_000):
        save_checkpoint(tmp_path / "last.pt", {"signature": SIGNATURE, "weights": torch.zeros(100_000)})
    assert list(tmp_path.iterdir()) == []
