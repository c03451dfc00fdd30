"""Checkpoints: written atomically (temporary file, fsync, rename), so a crash mid-write leaves
the previous checkpoint intact; read back only when complete and made by the same model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from soda.errors import CheckpointError
from soda.faults import mark

FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temporary files of writers that were killed mid-write (SIGKILL leaves no time to clean up).
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    mark("checkpoint.write")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format_version": FORMAT_VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, signature: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint at `path`, checked against `signature` (what must match to resume:
    the model and data settings). Any problem is a CheckpointError saying what to do."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt: {reason}); move it away to "
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
