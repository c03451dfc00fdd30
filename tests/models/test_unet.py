import pytest
import torch

from soda.models import LatentUNet
from tests.models.helpers import reference_soda

SMALL = dict(
    image_size=8,
    base_channels=16,
    channel_mults=(1, 2),
    attention_levels=(False, True),
    blocks_per_level=1,
    attention_heads=1,
    dropout=0.0,
    latent_dim=8,
    layer_groups=1,
    norm_groups=8,
)


def _inputs(batch=3, latent_dim=8):
    return torch.randn(batch, 3, 8, 8), torch.rand(batch), torch.randn(batch, latent_dim)


def test_output_has_the_input_shape():
    unet = LatentUNet(**SMALL)
    noisy, t, latent = _inputs()
    assert unet(noisy, t, latent).shape == noisy.shape


def test_reference_structure_attention_only_at_16x16_and_middle():
    with torch.device("meta"):
        unet = reference_soda().decoder
    attention = [name for name, m in unet.named_modules() if type(m).__name__ == "SelfAttention"]
    # 2 down blocks + 3 up blocks at the 16x16 level, plus the middle block's.
    assert len(attention) == 6
    assert len(unet.up) == 4 * 3 + 3 and len(unet.down) == 4 * 2 + 3


def test_latent_modulates_the_output():
    unet = LatentUNet(**SMALL).eval()
    noisy, t, latent = _inputs()
    assert not torch.allclose(unet(noisy, t, latent), unet(noisy, t, latent + 1.0))


def test_dropped_latent_output_does_not_depend_on_the_latent():
    unet = LatentUNet(**SMALL).eval()
    noisy, t, latent = _inputs()
    dropped = torch.zeros(3, 1)
    out = unet(noisy, t, latent, dropped)
    assert torch.equal(out, unet(noisy, t, torch.randn_like(latent), dropped))
    # A dropped latent is exactly a zero latent (classifier-free guidance's null condition).
    assert torch.equal(out, unet(noisy, t, torch.zeros_like(latent)))


def test_layer_masking_drops_exactly_the_masked_groups_sub_vector():
    unet = LatentUNet(**{**SMALL, "layer_groups": 2}).eval()
    noisy, t, latent = _inputs()
    keep_first_only = torch.tensor([[1.0, 0.0]]).expand(3, 2)
    changed_second = latent.clone()
    changed_second[:, 4:] = torch.randn(3, 4)  # group 1's sub-vector
    changed_first = latent.clone()
    changed_first[:, :4] = torch.randn(3, 4)  # group 0's sub-vector
    out = unet(noisy, t, latent, keep_first_only)
    assert torch.equal(out, unet(noisy, t, changed_second, keep_first_only))
    assert not torch.allclose(out, unet(noisy, t, changed_first, keep_first_only))
    # Unmasked, the second group's sub-vector matters again.
    assert not torch.allclose(unet(noisy, t, latent), unet(noisy, t, changed_second))


def test_layer_modulation_gives_each_block_only_its_sub_vector():
    unet = LatentUNet(**{**SMALL, "layer_groups": 2})
    projections = {name: m.latent_proj.in_features for name, m in unet.named_modules() if hasattr(m, "latent_proj")}
    assert set(projections.values()) == {4}
    groups = sorted({m.group for m in unet.modules() if hasattr(m, "group")})
    assert groups == [0, 1]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"image_size": 12, "channel_mults": (1, 2, 2, 2)}, r"image_size=12 cannot be halved 3 times.*multiples of 8"),
        ({"latent_dim": 10, "layer_groups": 2, "channel_mults": (1, 2, 2)}, None),
        ({"latent_dim": 9, "layer_groups": 2}, r"latent_dim=9 does not divide into layer_groups=2"),
        ({"layer_groups": 3}, r"layer_groups=3 must be between 1 and the number of levels \(2\)"),
        ({"base_channels": 20}, r"not divisible by norm_groups=8"),
        ({"attention_levels": (True,)}, r"attention_levels has 1 entries"),
    ],
)
def test_impossible_settings_are_value_errors_naming_the_argument(overrides, message):
    kwargs = {**SMALL, **overrides}
    if "channel_mults" in overrides and "attention_levels" not in overrides:
        kwargs["attention_levels"] = (False,) * len(overrides["channel_mults"])
    if message is None:
        LatentUNet(**{**kwargs, "image_size": 16})  # a valid combination builds
        return
    with pytest.raises(ValueError, match=message):
        LatentUNet(**kwargs)


def test_wrong_latent_shape_is_a_value_error():
    unet = LatentUNet(**SMALL)
    noisy, t, _ = _inputs()
    with pytest.raises(ValueError, match=r"latent has shape \(3, 5\); expected \(3, 8\)"):
        unet(noisy, t, torch.randn(3, 5))


@pytest.mark.parametrize("levels", [2, 3])
def test_the_image_size_check_refuses_exactly_the_sizes_a_forward_fails_at(levels, monkeypatch):
    # The UNet's skip connections match only when every halving is exact; the check says so
    # before a run starts, so it must refuse no size that works and pass none that fails.
    from soda.models import unet

    mults, attention = (1, 2, 2)[:levels], (False,) * levels
    refused = set()
    for size in range(8, 25):
        try:
            unet.check_unet(**{**SMALL, "image_size": size, "channel_mults": mults, "attention_levels": attention})
        except ValueError:
            refused.add(size)
    monkeypatch.setattr(unet, "check_unet", lambda **_: None)
    failed = set()
    for size in range(8, 25):
        net = LatentUNet(**{**SMALL, "image_size": size, "channel_mults": mults, "attention_levels": attention})
        try:
            net(torch.randn(2, 3, size, size), torch.rand(2), torch.randn(2, 8))
        except RuntimeError:
            failed.add(size)
    assert refused == failed and failed  # sizes that are not a multiple of 2 ** (levels - 1)
