"""Checkpoints: written atomically (temporary file, fsync, rename), so a crash mid-write leaves
the previous checkpoint intact; read back only when complete and made by the same model. What a
trainer's checkpoint holds (trainer_state) and how a trainer takes it back (restore_trainer)."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import torch

from soda.errors import CheckpointError, first_line
from soda.faults import mark
from soda.files import write_atomically

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically. A write the operating system refuses (a full disk, a
    quota, a file-size limit, a read-only directory) is a CheckpointError naming the reason; the
    previous checkpoint at `path` is then unchanged and no temporary file is left."""
    path = Path(path)

    def write(handle) -> None:
        mark("checkpoint.write")
        torch.save({"format_version": FORMAT_VERSION, **state}, handle)

    try:
        # Temporary files of writers that were killed mid-write (SIGKILL leaves no time to clean up).
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        write_atomically(path, write, fsync=True)
    except OSError as error:
        raise CheckpointError(_refused_message(path, error, state)) from None


def _refused_message(path: Path, error: OSError, state: dict[str, Any]) -> str:
    reason = f"{error.strerror or error} (errno {error.errno})"
    size = sum(t.numel() * t.element_size() for t in _tensors(state)) / 2**20
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        action = (
            f"the checkpoint needs about {size:.0f} MiB: free space there, or give the run a "
            f"directory on another disk (hydra.run.dir=... / hydra.sweep.dir=...)"
        )
    elif error.errno == errno.EFBIG:
        action = (
            f"the checkpoint needs about {size:.0f} MiB, more than this process may write to one "
            f"file (see `ulimit -f`) or the file system allows; raise the limit, or use another disk"
        )
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        action = "make that directory writable, or give the run another one (hydra.run.dir=...)"
    else:
        action = "check that disk, or give the run another directory (hydra.run.dir=...)"
    kept = "the previous checkpoint is unchanged" if path.exists() else "no checkpoint was written"
    return f"cannot write checkpoint {path}: {reason}; {action}; {kept}"


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


def load_checkpoint(path: str | os.PathLike, signature: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint at `path`, checked against `signature` (what must match to resume:
    the model and data settings). Any problem is a CheckpointError saying what to do."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt: {first_line(error)}); move it away to "
            f"start this run over, or restore a good copy"
        ) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a SODA checkpoint of format {FORMAT_VERSION}; move it away")
    saved = state.get("signature", {})
    differences = sorted(k for k in set(saved) | set(signature) if saved.get(k) != signature.get(k))
    if differences:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {signature.get(k)!r}" for k in differences[:4])
        raise CheckpointError(
            f"checkpoint {path} was made with other settings ({shown}); resume with the original "
            f"settings, or use a new run directory"
        )
    return state


def rng_state(device: torch.device) -> dict:
    """This process's random state: torch's, and the device's on CUDA."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def trainer_state(trainer, rng_states: list[dict]) -> dict:
    """What a soda.loop.Trainer's checkpoint holds (on rank 0, which keeps the EMA), with every
    rank's random state (`rng_states`, one entry per rank)."""
    return {
        "signature": trainer.signature,
        "epoch": trainer.epoch,
        "step_in_epoch": trainer.step_in_epoch,
        "global_step": trainer.global_step,
        "model": trainer.model.state_dict(),
        "ema": trainer.ema.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "rng": rng_states,
        "metrics": trainer.metrics,
        "train_seconds": trainer.train_seconds,
        "last_eval_seconds": trainer.last_eval_seconds,
        "mlflow_run_id": trainer.tracker.run_id or "",
    }


def restore_trainer(trainer, state: dict) -> None:
    """Put a checkpoint's `state` (trainer_state) back into `trainer`, this rank's random state
    included when the checkpoint has one per rank of this world."""
    trainer.model.load_state_dict(state["model"])
    if trainer.ema is not None:
        trainer.ema.load_state_dict(state["ema"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scaler.load_state_dict(state["scaler"])
    rng_states, world = state["rng"], trainer.world
    if len(rng_states) == world.world_size:
        mine = rng_states[world.rank]
        torch.set_rng_state(mine["torch"])
        if trainer.device.type == "cuda" and "cuda" in mine:
            torch.cuda.set_rng_state(mine["cuda"], trainer.device)
    else:
        log.warning(
            "checkpoint has %d RNG states for %d ranks: resuming with fresh per-rank seeds, "
            "so the run will not repeat an uninterrupted one bit for bit",
            len(rng_states),
            world.world_size,
        )
    trainer.epoch = state["epoch"]
    trainer.step_in_epoch = state["step_in_epoch"]
    trainer.global_step = state["global_step"]
    trainer.metrics = dict(state["metrics"])
    # Checkpoints written before the training clock existed have none of it.
    trainer.train_seconds = state.get("train_seconds", 0.0)
    trainer.last_eval_seconds = state.get("last_eval_seconds", 0.0)
