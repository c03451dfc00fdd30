"""The EMA of the model's weights, updated without host syncs.

ema-pytorch's `EMA.update()` reads its step counter, its init flag and its decay back from the
device (three `.item()` calls per step): on a GPU each one waits for the queued step to finish,
so the CPU can never run ahead. `SyncFreeEMA` keeps the same state, formula and checkpoint
format, mirrors the counter on the host, and updates every tensor with one foreach lerp.
"""

from __future__ import annotations

import torch
from ema_pytorch import EMA


class SyncFreeEMA(EMA):
    def __init__(self, model: torch.nn.Module, **kwargs):
        super().__init__(model, use_foreach=True, **kwargs)
        self._host_step = 0
        self._host_initted = False

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._host_step = int(self.step.item())  # once per resume
        self._host_initted = bool(self.initted.item())
        return result

    def current_decay(self, step: int) -> float:
        """ema-pytorch's warm-up `1 - (1 + epoch / inv_gamma) ** -power` clamped to [min_value,
        beta], computed in float32 on the host exactly as it computes it on the device."""
        epoch = torch.tensor(step - self.update_after_step - 1).clamp(min=0.0)
        if epoch.item() <= 0:
            return 0.0
        value = 1 - (1 + epoch / self.inv_gamma) ** -self.power
        return value.clamp(min=self.min_value, max=self.beta).item()

    @torch.no_grad()
    def update(self) -> None:
        step = self._host_step
        self._host_step += 1
        self.step.add_(1)  # the device copy, for checkpoints; written, never read back here
        if not self._host_initted:
            self.copy_params_from_model_to_ema()
            self.initted.fill_(True)
            self._host_initted = True
            return
        if step % self.update_every != 0:
            return
        if step <= self.update_after_step:
            self.copy_params_from_model_to_ema()
            return
        decay = self.current_decay(step + 1)  # ema-pytorch computes it after its increment
        self.update_moving_average(self.ema_model, self.model, current_decay=decay)
