"""SODA: an encoder squeezes a source view into a latent; a latent-modulated UNet denoises a
target view. All images given to this module are in [0, 1]; the model normalises the
encoder's input with the data set's mean/std itself, so training, evaluation and sampling
cannot disagree about it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from soda.models.diffusion import GaussianDiffusion, check_schedule
from soda.models.encoder import ResNetEncoder, check_encoder
from soda.models.unet import LatentUNet, check_unet


def check_conditioning(
    latent_drop_prob: float, layer_mask_prob: float, source_noise_std: float, name: Callable[[str], str] = str
) -> None:
    """A ValueError when SODA cannot take these conditioning settings (`name`: as in
    soda.models.unet.check_unet)."""
    for key, p in (("latent_drop_prob", latent_drop_prob), ("layer_mask_prob", layer_mask_prob)):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name(key)}={p} must be in [0, 1)")
    if source_noise_std < 0:
        raise ValueError(f"{name('source_noise_std')}={source_noise_std} must be non-negative")


class SODA(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        decoder: LatentUNet,
        diffusion: GaussianDiffusion,
        *,
        latent_drop_prob: float,  # whole-latent dropout: trains the unconditional branch for guidance
        layer_mask_prob: float,  # per-group modulation dropout (layer masking); 0 = the reference
        source_noise_std: float,  # Gaussian noise on the normalised source view, training only
        input_mean: Sequence[float],
        input_std: Sequence[float],
    ):
        super().__init__()
        check_conditioning(latent_drop_prob, layer_mask_prob, source_noise_std)
        self.encoder = encoder
        self.decoder = decoder
        self.diffusion = diffusion
        self.latent_drop_prob = latent_drop_prob
        self.layer_mask_prob = layer_mask_prob
        self.source_noise_std = source_noise_std
        self.register_buffer("input_mean", torch.tensor(input_mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("input_std", torch.tensor(input_std, dtype=torch.float32).view(1, -1, 1, 1))

    def _encoder_input(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.input_mean) / self.input_std

    def encode(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Latents of images in [0, 1]; L2-normalised (the probes' features) unless told otherwise."""
        latent = self.encoder(self._encoder_input(images))
        return F.normalize(latent.float(), dim=1) if normalize else latent

    def sample_keep(self, batch: int, device) -> torch.Tensor:
        """[batch, layer_groups] 0/1 mask: whole-latent dropout times per-group layer masking."""
        groups = self.decoder.layer_groups
        keep = torch.rand(batch, 1, device=device) >= self.latent_drop_prob
        if self.layer_mask_prob > 0:
            keep = keep & (torch.rand(batch, groups, device=device) >= self.layer_mask_prob)
        return keep.expand(batch, groups).float()

    def loss(self, source_view: torch.Tensor, target_view: torch.Tensor) -> torch.Tensor:
        """Noise-prediction loss of the decoder on the target view, modulated by the source's latent."""
        source = self._encoder_input(source_view)
        if self.source_noise_std > 0:
            source = source + self.source_noise_std * torch.randn_like(source)
        latent = self.encoder(source)
        x0 = target_view * 2 - 1
        t = self.diffusion.sample_timesteps(x0.shape[0], device=x0.device)
        noise = torch.randn_like(x0)
        noisy = self.diffusion.q_sample(x0, t, noise)
        keep = self.sample_keep(x0.shape[0], x0.device)
        predicted = self.decoder(noisy, t.float() / self.diffusion.timesteps, latent, keep)
        return self.diffusion.noise_prediction_loss(predicted, noise)

    def forward(self, source_view: torch.Tensor, target_view: torch.Tensor) -> torch.Tensor:
        """The training loss, so that DistributedDataParallel (which wraps forward) can sync it."""
        return self.loss(source_view, target_view)

    @torch.no_grad()
    def sample(
        self,
        latents: torch.Tensor,
        *,
        steps: int,  # DDIM steps (eval.sample_steps)
        eta: float,  # 0 = deterministic DDIM
        guidance: float,  # classifier-free guidance weight w
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DDIM samples in [0, 1] guided by `latents` (unnormalised encoder outputs).

        Classifier-free guidance: eps = (1 + w) eps(z) - w eps(no z), both in one doubled batch.
        """
        decoder = self.decoder
        batch = latents.shape[0]
        shape = (batch, decoder.image_channels, decoder.image_size, decoder.image_size)
        if noise is None:
            noise = torch.randn(shape, device=latents.device, generator=generator)
        elif noise.shape != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {shape}")
        groups = decoder.layer_groups
        keep = torch.cat([torch.ones(batch, groups), torch.zeros(batch, groups)]).to(latents.device)
        doubled_latents = torch.cat([latents, latents])

        def predict_noise(x, t):
            t = t.float() / self.diffusion.timesteps
            if guidance == 0:
                return decoder(x, t, latents)
            eps = decoder(torch.cat([x, x]), torch.cat([t, t]), doubled_latents, keep).float()
            conditional, unconditional = eps.chunk(2)
            return (1 + guidance) * conditional - guidance * unconditional

        was_training = self.training
        self.eval()
        try:
            x0 = self.diffusion.ddim_sample(predict_noise, noise, steps=steps, eta=eta, generator=generator)
        finally:
            self.train(was_training)
        return ((x0 + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, **sample_kwargs) -> torch.Tensor:
        """Encode images in [0, 1] and decode them again by guided DDIM sampling (`sample_kwargs`:
        sample's steps, eta, guidance, and optionally generator)."""
        was_training = self.training
        self.eval()
        try:
            latents = self.encode(images, normalize=False).float()
        finally:
            self.train(was_training)
        return self.sample(latents, **sample_kwargs)


def build_soda(
    *,
    # Encoder.
    arch: str,  # resnet18 | resnet50
    latent_dim: int,
    small_images: bool,  # 3x3 stride-1 stem, no max-pool (32x32 images)
    # Decoder.
    image_size: int,
    base_channels: int,
    channel_mults: Sequence[int],
    attention_levels: Sequence[bool],
    blocks_per_level: int,
    attention_heads: int,
    dropout: float,
    norm_groups: int,
    layer_groups: int,
    # Conditioning.
    layer_mask_prob: float,
    latent_drop_prob: float,
    source_noise_std: float,
    # Diffusion.
    noise_schedule: str,  # linear | cosine | inverted_cosine
    timesteps: int,
    beta_start: float,
    beta_end: float,
    # Input: the data set's per-channel mean and std, for the encoder's input.
    input_mean: Sequence[float],
    input_std: Sequence[float],
) -> SODA:
    """The model from plain arguments, named as the run config's model node (conf/model/, where
    the reference values are): build_soda(**settings.model_arguments())."""
    encoder = ResNetEncoder(arch=arch, latent_dim=latent_dim, small_images=small_images)
    decoder = LatentUNet(
        image_size=image_size,
        base_channels=base_channels,
        channel_mults=tuple(channel_mults),
        attention_levels=tuple(attention_levels),
        blocks_per_level=blocks_per_level,
        attention_heads=attention_heads,
        dropout=dropout,
        latent_dim=latent_dim,
        layer_groups=layer_groups,
        norm_groups=norm_groups,
    )
    diffusion = GaussianDiffusion(
        noise_schedule=noise_schedule, timesteps=timesteps, beta_start=beta_start, beta_end=beta_end
    )
    return SODA(
        encoder,
        decoder,
        diffusion,
        latent_drop_prob=latent_drop_prob,
        layer_mask_prob=layer_mask_prob,
        source_noise_std=source_noise_std,
        input_mean=tuple(input_mean),
        input_std=tuple(input_std),
    )


def check_soda_arguments(name: Callable[[str], str] = str, **arguments) -> None:
    """A ValueError, the first that build_soda(**arguments) would raise, without building anything:
    the checks of each part's constructor, as pure functions (so the config checks a run before
    any launch, in microseconds). `name` gives an argument the name a message uses for it."""
    a = inspect.signature(build_soda).bind(**arguments).arguments  # build_soda's arguments, all of them
    check_encoder(a["arch"], a["latent_dim"], name)
    unet = inspect.signature(check_unet).parameters
    check_unet(**{key: a[key] for key in unet if key != "name"}, name=name)
    check_schedule(a["noise_schedule"], a["timesteps"], a["beta_start"], a["beta_end"], name)
    check_conditioning(a["latent_drop_prob"], a["layer_mask_prob"], a["source_noise_std"], name)
