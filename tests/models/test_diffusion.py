import math

import pytest
import torch

from soda.models.diffusion import make_betas
from tests.models.helpers import diffusion as make_diffusion


def _fraction_of_middle_noise(diffusion, low=0.1, high=0.9):
    """Share of uniformly drawn timesteps whose alpha_bar lies in [low, high]."""
    alpha_bar = diffusion.alphas_cumprod[1:].double()
    return ((alpha_bar >= low) & (alpha_bar <= high)).double().mean().item()


def test_linear_schedule_equals_its_closed_form():
    diffusion = make_diffusion()
    expected_betas = torch.tensor([1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)], dtype=torch.float64)
    assert torch.allclose(diffusion.betas[1:].double(), expected_betas, rtol=1e-6, atol=0)
    expected_alpha_bar = torch.cumprod(1 - expected_betas, 0)
    assert torch.allclose(diffusion.alphas_cumprod[1:].double(), expected_alpha_bar, rtol=1e-5, atol=1e-7)
    assert diffusion.alphas_cumprod[0] == 1.0 and diffusion.betas[0] == 0.0


@pytest.mark.parametrize("schedule", ["cosine", "inverted_cosine"])
def test_cosine_type_schedules_equal_their_closed_forms(schedule):
    T, s = 1000, 0.008
    diffusion = make_diffusion(noise_schedule=schedule, timesteps=T)
    u = torch.arange(T + 1, dtype=torch.float64) / T
    if schedule == "cosine":
        closed = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    else:
        closed = (2 * (1 + s) / math.pi) * torch.arccos(u.sqrt()) - s
    # Betas are clipped at 0.999 only on the very last steps, where alpha_bar reaches 0 or below.
    unclipped = (make_betas(schedule, T) < 0.999).nonzero().max().item()
    assert unclipped >= T - 3
    assert torch.allclose(
        diffusion.alphas_cumprod[: unclipped + 1].double(), closed[: unclipped + 1], rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("schedule", ["linear", "cosine", "inverted_cosine"])
def test_alpha_bar_is_strictly_decreasing_from_one_and_stays_positive(schedule):
    diffusion = make_diffusion(noise_schedule=schedule)
    alpha_bar = diffusion.alphas_cumprod
    assert alpha_bar[0] == 1.0
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()
    assert (alpha_bar > 0).all() and alpha_bar[-1] < 1e-3


def test_inverted_cosine_puts_most_timesteps_on_middle_noise_levels():
    inverted = _fraction_of_middle_noise(make_diffusion(noise_schedule="inverted_cosine"))
    cosine = _fraction_of_middle_noise(make_diffusion(noise_schedule="cosine"))
    linear = _fraction_of_middle_noise(make_diffusion(noise_schedule="linear"))
    # Closed form: alpha_bar in [0.1, 0.9] for t/T in [0.0245, 0.9755] (95 %) vs cosine's 59 %.
    assert inverted > 0.93
    assert cosine < 0.65 and linear < 0.5


def test_schedule_lives_in_buffers_that_follow_the_module():
    diffusion = make_diffusion(noise_schedule="cosine")
    names = {name for name, _ in diffusion.named_buffers()}
    assert {"betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"} <= names
    assert set(diffusion.state_dict()) == names
    assert diffusion.to(torch.float64).alphas_cumprod.dtype == torch.float64


def test_q_sample_mixes_signal_and_noise_by_alpha_bar():
    diffusion = make_diffusion(noise_schedule="linear")
    x0, noise = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    t = torch.tensor([1, 1000])
    noisy = diffusion.q_sample(x0, t, noise)
    assert torch.allclose(noisy[0], diffusion.alphas_cumprod[1].sqrt().expand(3, 4, 4))
    assert torch.allclose(noisy[1], diffusion.alphas_cumprod[1000].sqrt().expand(3, 4, 4))


def test_ddim_visits_the_references_timesteps():
    diffusion = make_diffusion(timesteps=1000)
    times = diffusion.ddim_timesteps(100)
    assert times[:3] == [991, 981, 971] and times[-2:] == [1, 0] and len(times) == 101


def test_ddim_with_a_perfect_noise_predictor_recovers_x0():
    diffusion = make_diffusion(timesteps=1000)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    # x_T built from x0 and noise; an oracle that knows x0 returns the implied noise at every step.
    x_T = diffusion.q_sample(x0, torch.tensor([991, 991]), noise)

    def oracle(x, t):
        a = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    assert torch.allclose(diffusion.ddim_sample(oracle, x_T, steps=10), x0, atol=1e-4)


def test_unknown_schedule_and_bad_steps_are_value_errors():
    with pytest.raises(ValueError, match=r"schedule='sigmoid'.*linear, cosine, inverted_cosine"):
        make_diffusion(noise_schedule="sigmoid")
    with pytest.raises(ValueError, match=r"steps=0 must be between 1 and"):
        make_diffusion(timesteps=10).ddim_timesteps(0)
