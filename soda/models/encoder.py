"""ResNet encoders that squeeze an image into the latent that modulates the decoder."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ARCHITECTURES = ("resnet18", "resnet50")


def check_encoder(arch: str, latent_dim: int, name: Callable[[str], str] = str) -> None:
    """A ValueError when ResNetEncoder cannot be built from these arguments (`name`: as in
    soda.models.unet.check_unet)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"{name('arch')}={arch!r} is not a known encoder; allowed: {', '.join(ARCHITECTURES)}")
    if latent_dim < 1:
        raise ValueError(f"{name('latent_dim')}={latent_dim} must be a positive integer")


class ResNetEncoder(nn.Module):
    """A torchvision ResNet whose classifier head maps to the latent instead of classes.

    `small_images=True` is the CIFAR stem: a 3x3 stride-1 first convolution and no max-pool,
    so a 32x32 image is not reduced to 8x8 before the first residual stage.
    """

    def __init__(self, arch: str, latent_dim: int, small_images: bool):
        super().__init__()
        check_encoder(arch, latent_dim)
        # Imported here: torchvision takes seconds to import, and the config's checks import this
        # module (check_encoder) without building an encoder.
        from torchvision.models import resnet

        self.arch = arch
        self.latent_dim = latent_dim
        # num_classes sizes the final fc: feature width (512 or 2048) -> latent_dim.
        self.net = getattr(resnet, arch)(weights=None, num_classes=latent_dim)
        if small_images:
            self.net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.net.maxpool = nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)
