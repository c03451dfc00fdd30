"""The divergence watch of the training loop: whether any step so far had a non-finite loss (or
gradient norm), and the first such step with its values.

It is kept on the device so that a step never waits for it, and read back only where a diverged
model could leave a trace: log points, evaluations, checkpoints and the end of fit."""

from __future__ import annotations

import math

import torch

from soda import dist
from soda.errors import DivergenceError
from soda.record import TRAIN_LOSS

DIVERGENCE_ADVICE = "lower schedule.decoder_lr, keep schedule.grad_clip, or try schedule.precision=bf16"


class DivergenceWatch:
    def __init__(self, device: torch.device):
        self.device = device
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self.loss = torch.zeros((), device=device)
        self.grad_norm = torch.zeros((), device=device)

    def fold(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """Fold step `step` into the watch with device ops only: no host sync, no random draws,
        nothing that the model or the optimiser reads."""
        nonfinite = ~torch.isfinite(loss)
        if grad_norm is not None:
            nonfinite |= ~torch.isfinite(grad_norm)
        first = nonfinite & ~self.nonfinite
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss.float(), self.loss)
        if grad_norm is not None:
            self.grad_norm = torch.where(first, grad_norm.float(), self.grad_norm)
        self.nonfinite |= nonfinite

    def raise_if_diverged(self, global_step: int) -> None:
        """Raise DivergenceError on every rank if any rank saw a non-finite loss (or gradient
        norm) since the run started. One host sync (two under DDP): call it only where a
        diverged model could leave a trace, never per step."""
        diverged_here = bool(self.nonfinite.item())
        if not dist.any_rank(diverged_here, self.device):
            return
        if not diverged_here:
            # Every rank raises together; the rank that diverged names the step in its message.
            raise DivergenceError(
                f"{TRAIN_LOSS} became non-finite on another rank by step {global_step}; {DIVERGENCE_ADVICE}"
            )
        step, loss = int(self.step.item()), self.loss.item()
        if not math.isfinite(loss):
            raise DivergenceError(f"{TRAIN_LOSS} is {loss} at step {step}; {DIVERGENCE_ADVICE}")
        raise DivergenceError(
            f"the gradient norm is {self.grad_norm.item()} at step {step} "
            f"({TRAIN_LOSS} {loss:.4g}), so AdamW made the weights non-finite; {DIVERGENCE_ADVICE}"
        )
