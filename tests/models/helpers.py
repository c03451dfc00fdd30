from soda.models import build_soda

TINY = dict(
    arch="resnet18",
    latent_dim=16,
    image_size=8,
    base_channels=16,
    channel_mults=(1, 2),
    attention_levels=(False, True),
    blocks_per_level=1,
    norm_groups=8,
    timesteps=100,
)


def tiny_soda(**overrides):
    return build_soda(**{**TINY, **overrides})
