from soda.models import build_soda
from soda.models.diffusion import GaussianDiffusion

# Every argument of build_soda: a model that builds and trains in milliseconds on 8x8 images.
TINY = dict(
    arch="resnet18",
    latent_dim=16,
    small_images=True,
    image_size=8,
    base_channels=16,
    channel_mults=(1, 2),
    attention_levels=(False, True),
    blocks_per_level=1,
    attention_heads=1,
    dropout=0.1,
    norm_groups=8,
    layer_groups=1,
    layer_mask_prob=0.0,
    latent_drop_prob=0.1,
    source_noise_std=0.1,
    noise_schedule="linear",
    timesteps=100,
    beta_start=1e-4,
    beta_end=0.02,
    input_mean=(0.5, 0.5, 0.5),
    input_std=(0.25, 0.25, 0.25),
)


def tiny_soda(**overrides):
    return build_soda(**{**TINY, **overrides})


def reference_soda():
    """The model of the composed default config (conf/), as the trainer builds it."""
    from soda.config import compose

    return build_soda(**compose().model_arguments())


def diffusion(**overrides) -> GaussianDiffusion:
    """The reference's diffusion (linear betas 1e-4 -> 0.02 over 1000 steps), or a variant."""
    return GaussianDiffusion(
        **{**dict(noise_schedule="linear", timesteps=1000, beta_start=1e-4, beta_end=0.02), **overrides}
    )
