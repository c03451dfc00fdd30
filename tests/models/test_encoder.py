import pytest
import torch

from soda.models import ResNetEncoder
from tests.models.helpers import reference_soda


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_reference_cifar10_parameter_counts_match_the_seed_exactly():
    with torch.device("meta"):
        model = reference_soda()  # conf/'s defaults: model=soda_r18_ddpm dataset=cifar10
    # 11.2 M + 39.6 M in the paper; the exact figures of the reference implementation.
    assert _count(model.encoder) == 11_234_496
    assert _count(model.decoder) == 39_595_139


def test_small_image_stem_keeps_resolution_and_head_maps_to_latent():
    encoder = ResNetEncoder("resnet18", latent_dim=64, small_images=True)
    assert encoder.net.conv1.kernel_size == (3, 3) and encoder.net.conv1.stride == (1, 1)
    assert isinstance(encoder.net.maxpool, torch.nn.Identity)
    assert encoder(torch.rand(2, 3, 32, 32)).shape == (2, 64)
    large = ResNetEncoder("resnet18", latent_dim=64, small_images=False)
    assert large.net.conv1.kernel_size == (7, 7) and large.net.conv1.stride == (2, 2)


def test_resnet50_head_maps_2048_features_to_the_latent():
    with torch.device("meta"):
        encoder = ResNetEncoder("resnet50", latent_dim=256, small_images=True)
    assert encoder.net.fc.in_features == 2048 and encoder.net.fc.out_features == 256


def test_unknown_architecture_is_a_value_error_naming_the_allowed_ones():
    with pytest.raises(ValueError, match=r"arch='vgg16'.*resnet18, resnet50"):
        ResNetEncoder("vgg16", latent_dim=64, small_images=True)
