import pytest
import torch

from soda.models import build_soda
from tests.models.helpers import TINY, tiny_soda


def test_loss_goes_down_on_a_fixed_tiny_batch():
    torch.manual_seed(0)
    model = tiny_soda(latent_drop_prob=0.0, source_noise_std=0.0, dropout=0.0)
    images = torch.rand(8, 3, 8, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def fixed_loss():
        # The same timesteps and noise each time, so the two figures are comparable.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            model.eval()
            with torch.no_grad():
                value = sum(model.loss(images, images).item() for _ in range(4)) / 4
            model.train()
        return value

    before = fixed_loss()
    for _ in range(40):
        loss = model.loss(images, images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = fixed_loss()
    assert after < 0.8 * before, (before, after)


def test_loss_passes_a_sampled_keep_mask_to_the_decoder():
    model = tiny_soda(layer_groups=2, latent_drop_prob=0.5, layer_mask_prob=0.5)
    seen = {}

    def capture(module, args):
        seen["keep"] = args[3]

    model.decoder.register_forward_pre_hook(capture)
    model.loss(torch.rand(64, 3, 8, 8), torch.rand(64, 3, 8, 8))
    keep = seen["keep"]
    assert keep.shape == (64, 2) and set(keep.unique().tolist()) == {0.0, 1.0}


def test_keep_mask_drops_latents_and_groups_at_the_configured_rates():
    model = tiny_soda(layer_groups=2, latent_drop_prob=0.1, layer_mask_prob=0.3)
    keep = model.sample_keep(200_000, "cpu")
    whole_dropped = (keep.sum(1) == 0).float().mean().item()
    # A group survives when neither the whole latent (0.1) nor the group (0.3) is dropped.
    assert abs(keep[:, 0].mean().item() - 0.9 * 0.7) < 0.005
    assert abs(keep[:, 1].mean().item() - 0.9 * 0.7) < 0.005
    assert abs(whole_dropped - (0.1 + 0.9 * 0.3 * 0.3)) < 0.005
    # Groups are masked independently: both kept together at the product rate.
    assert abs((keep.sum(1) == 2).float().mean().item() - 0.9 * 0.7 * 0.7) < 0.005


def test_reference_setting_without_layer_masking_drops_whole_latents_only():
    model = tiny_soda(latent_drop_prob=0.1)
    keep = model.sample_keep(100_000, "cpu")
    assert keep.shape == (100_000, 1)
    assert abs(1 - keep.mean().item() - 0.1) < 0.005


def test_encode_is_l2_normalised_on_request():
    model = tiny_soda().eval()
    images = torch.rand(4, 3, 8, 8)
    normalized = model.encode(images)
    assert torch.allclose(normalized.norm(dim=1), torch.ones(4), atol=1e-5)
    raw = model.encode(images, normalize=False)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=1), normalized, atol=1e-6)


def test_ddim_with_guidance_returns_images_in_unit_range_deterministic_for_eta_zero():
    model = tiny_soda()
    latents = torch.randn(3, 16)
    noise = torch.randn(3, 3, 8, 8)
    first = model.sample(
        latents, steps=5, eta=0.0, guidance=0.3, noise=noise, generator=torch.Generator().manual_seed(1)
    )
    second = model.sample(
        latents, steps=5, eta=0.0, guidance=0.3, noise=noise, generator=torch.Generator().manual_seed(2)
    )
    assert first.shape == (3, 3, 8, 8)
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, second)
    assert model.training, "sampling must restore training mode"
    # eta > 0 draws fresh noise each step; guidance changes the prediction.
    stochastic = model.sample(
        latents, steps=5, eta=1.0, guidance=0.3, noise=noise, generator=torch.Generator().manual_seed(2)
    )
    assert not torch.equal(first, stochastic)
    unguided = model.sample(latents, steps=5, eta=0.0, guidance=0.0, noise=noise)
    assert not torch.equal(first, unguided)


def test_reconstruct_returns_one_image_per_input():
    model = tiny_soda()
    images = torch.rand(2, 3, 8, 8)
    out = model.reconstruct(images, steps=3, eta=0.0, guidance=0.3, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1


def test_build_soda_takes_the_model_config_under_its_own_names():
    import dataclasses
    import inspect

    from soda.config import ModelConfig
    from soda.models import build_soda

    schema = {f.name for f in dataclasses.fields(ModelConfig)} - {"name"}
    from_data = {"image_size", "input_mean", "input_std"}
    assert set(inspect.signature(build_soda).parameters) == schema | from_data
    assert all(p.default is inspect.Parameter.empty for p in inspect.signature(build_soda).parameters.values())


def test_the_trainers_call_builds_from_the_composed_config():
    from dataclasses import asdict

    from soda.config import compose
    from soda.models import build_soda

    settings = compose(["model=tiny", "dataset=shapes", "model.noise_schedule=cosine"])
    model_settings = {k: v for k, v in asdict(settings.model).items() if k != "name"}
    data = settings.dataset
    model = build_soda(
        **model_settings, image_size=data.image_size, input_mean=tuple(data.mean), input_std=tuple(data.std)
    )
    assert model.diffusion.noise_schedule == "cosine" and model.decoder.image_size == 16
    assert model.input_std.flatten().tolist() == list(data.std)
    assert build_soda(**settings.model_arguments()).decoder.latent_dim == settings.model.latent_dim


# Each a value that one part's constructor refuses (or, before its check, crashed on).
BAD_ARGUMENTS = [
    {"arch": "vgg16"},
    {"latent_dim": 0},
    {"image_size": 12, "channel_mults": (1, 2, 2, 2), "attention_levels": (False,) * 4},
    {"image_size": 20, "channel_mults": (1, 2, 2, 2), "attention_levels": (False,) * 4},
    {"layer_groups": 3},
    {"layer_groups": 0},
    {"latent_dim": 9, "layer_groups": 2},
    {"attention_heads": 3},
    {"attention_heads": 0},
    {"norm_groups": 7},
    {"norm_groups": 0},
    {"base_channels": 0},
    {"base_channels": 20},
    {"attention_levels": (True,)},
    {"channel_mults": ()},
    {"blocks_per_level": 0},
    {"dropout": 1.0},
    {"noise_schedule": "sigmoid"},
    {"timesteps": 0},
    {"beta_start": 0.5, "beta_end": 0.1},
    {"latent_drop_prob": 1.0},
    {"layer_mask_prob": -0.1},
    {"source_noise_std": -1.0},
]


@pytest.mark.parametrize("bad", BAD_ARGUMENTS, ids=lambda bad: ",".join(f"{k}={v}" for k, v in bad.items()))
def test_the_pure_check_refuses_what_the_constructors_refuse_with_their_message(bad):
    # soda.config checks a run with check_soda_arguments, without building: it must refuse exactly
    # what build_soda refuses, in the same words (weights on the meta device: nothing allocated).
    from soda.models.soda import check_soda_arguments

    arguments = {**TINY, **bad}
    with pytest.raises(ValueError) as checked:
        check_soda_arguments(**arguments)
    with pytest.raises(ValueError) as built, torch.device("meta"):
        build_soda(**arguments)
    assert str(checked.value) == str(built.value)
    assert "\n" not in str(checked.value)
    check_soda_arguments(**TINY)  # and passes what builds


def test_the_check_names_each_argument_as_the_caller_asks():
    from soda.models.soda import check_soda_arguments

    keys = {"image_size": "dataset.image_size"}

    def name(key: str) -> str:
        return keys.get(key, f"model.{key}")

    with pytest.raises(ValueError, match=r"^model\.latent_dim=9 does not divide into model\.layer_groups=2 "):
        check_soda_arguments(name=name, **{**TINY, "latent_dim": 9, "layer_groups": 2})
    with pytest.raises(ValueError, match=r"^dataset\.image_size=9 cannot be halved 1 times .*\(model\.channel_mults\)"):
        check_soda_arguments(name=name, **{**TINY, "image_size": 9})
