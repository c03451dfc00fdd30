"""Gaussian diffusion: noise schedules, forward noising, the noise-prediction loss, DDIM sampling.

Timesteps are integers 1..T; index 0 of every table is the clean image (alpha_bar = 1), so a DDIM
trajectory that ends at step 0 returns its x0 estimate exactly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

SCHEDULES = ("linear", "cosine", "inverted_cosine")


def cosine_alpha_bar(u: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule at fractional time u in [0, 1]."""
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return f / math.cos(s / (1 + s) * math.pi / 2) ** 2


def inverted_cosine_alpha_bar(u: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """SODA's inverted cosine: (2(1+s)/pi) arccos(sqrt(u)) - s, which is already 1 at u = 0.

    Its slope is steep at both ends and flat in the middle, so uniformly drawn timesteps land
    mostly on middle noise levels.
    """
    return (2 * (1 + s) / math.pi) * torch.arccos(torch.sqrt(u)) - s


def check_schedule(
    noise_schedule: str, timesteps: int, beta_start: float, beta_end: float, name: Callable[[str], str] = str
) -> None:
    """A ValueError when make_betas cannot make this schedule (`name`: as in
    soda.models.unet.check_unet)."""
    if noise_schedule not in SCHEDULES:
        raise ValueError(f"{name('noise_schedule')}={noise_schedule!r} is not known; allowed: {', '.join(SCHEDULES)}")
    if timesteps < 1:
        raise ValueError(f"{name('timesteps')}={timesteps} must be at least 1")
    if noise_schedule == "linear" and not 0.0 < beta_start < beta_end < 1.0:
        raise ValueError(
            f"a linear {name('noise_schedule')} needs 0 < {name('beta_start')} < {name('beta_end')} < 1; "
            f"got {beta_start}, {beta_end}"
        )


def make_betas(
    noise_schedule: str,
    timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    s: float = 0.008,
    max_beta: float = 0.999,
) -> torch.Tensor:
    """Betas for steps 1..T in float64. Cosine-type schedules are defined by alpha_bar; their betas
    are its step ratios, clipped at `max_beta` so the last steps stay invertible."""
    check_schedule(noise_schedule, timesteps, beta_start, beta_end)
    if noise_schedule == "linear":
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    alpha_bar = cosine_alpha_bar if noise_schedule == "cosine" else inverted_cosine_alpha_bar
    u = torch.linspace(0, 1, timesteps + 1, dtype=torch.float64)
    values = alpha_bar(u, s)
    return (1 - values[1:] / values[:-1]).clamp(0, max_beta)


class GaussianDiffusion(nn.Module):
    """Holds the schedule as buffers so it follows the module to its device and into checkpoints."""

    def __init__(
        self,
        noise_schedule: str,
        timesteps: int,
        beta_start: float,
        beta_end: float,
        s: float = 0.008,
    ):
        super().__init__()
        self.noise_schedule = noise_schedule
        self.timesteps = timesteps
        betas = torch.cat(
            [torch.zeros(1, dtype=torch.float64), make_betas(noise_schedule, timesteps, beta_start, beta_end, s)]
        )
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.register_buffer("betas", betas.float())
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt().float())
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt().float())

    def sample_timesteps(self, batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """t ~ U{1..T}."""
        return torch.randint(1, self.timesteps + 1, (batch,), device=device, generator=generator)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return self.sqrt_alphas_cumprod[t].view(shape) * x0 + self.sqrt_one_minus_alphas_cumprod[t].view(shape) * noise

    @staticmethod
    def noise_prediction_loss(predicted_noise: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """DDPM's simple loss: mean squared error between true and predicted noise (in fp32)."""
        return F.mse_loss(predicted_noise.float(), noise.float())

    def ddim_timesteps(self, steps: int) -> list[int]:
        """Descending visit order, e.g. T=1000, steps=100: 991, 981, ..., 1, then 0."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps={steps} must be between 1 and the number of timesteps ({self.timesteps})")
        stride = self.timesteps // steps
        return list(range(1 + stride * (steps - 1), 0, -stride)) + [0]

    @torch.no_grad()
    def ddim_sample(
        self,
        predict_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        noise: torch.Tensor,
        steps: int = 100,
        eta: float = 0.0,
        clip: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Run DDIM from x_T = `noise` to an x0 estimate in [-1, 1] (with `clip`).

        `predict_noise(x_t, t)` gets integer timesteps [batch]. eta = 0 draws no randomness after
        `noise`, so the result is a deterministic function of it; eta = 1 is DDPM-like.
        """
        if eta < 0:
            raise ValueError(f"eta={eta} must be non-negative")
        x = noise.float()
        times = self.ddim_timesteps(steps)
        for time, time_next in itertools.pairwise(times):
            alpha, alpha_next = self.alphas_cumprod[time], self.alphas_cumprod[time_next]
            t = torch.full((x.shape[0],), time, device=x.device, dtype=torch.long)
            eps = predict_noise(x, t).float()
            x0 = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
            if clip:
                # Clip in pixel space, then re-derive the noise that is consistent with the clip.
                x0 = x0.clamp(-1.0, 1.0)
                eps = (x - alpha.sqrt() * x0) / (1 - alpha).sqrt()
            sigma = eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt()
            direction = (1 - alpha_next - sigma**2).clamp(min=0).sqrt()
            x = alpha_next.sqrt() * x0 + direction * eps
            if eta > 0 and time_next > 0:
                x = x + sigma * torch.randn(x.shape, device=x.device, generator=generator)
        return x
