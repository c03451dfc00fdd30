"""torch.compile of the training loss, with a fallback to eager where compiling fails."""

from __future__ import annotations

import logging

import torch

from soda.errors import first_line

log = logging.getLogger(__name__)


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
    return EagerFallback(compiled, loss_fn)


def compile_state(loss_fn) -> str:
    """eager (not asked for), compiled, or fallback (compiling failed: training ran eager)."""
    if not isinstance(loss_fn, EagerFallback):
        return "eager"
    return "fallback" if loss_fn.compiled is loss_fn.eager else "compiled"


class EagerFallback:
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
            log.warning("torch.compile failed (%s); training eager", first_line(error, limit=300))
            self.compiled = self.eager
            result = self.eager(*args)
        self.checked = True
        return result
