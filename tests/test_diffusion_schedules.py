"""Noise schedules against the published formulas, computed here in plain float math."""

import math

import pytest
import torch

from imagen.diffusion import NoiseSchedule, cosine_beta_schedule, extract, linear_beta_schedule, spaced_timesteps


def _cosine_f(t, T, s=0.008):
    return math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2


def test_cosine_alphas_cumprod_follow_eq_17():
    T = 1000
    sched = NoiseSchedule.from_name("cosine", T=T)
    # Index t holds diffusion step t+1: alphas_cumprod[t] = f(t+1) / f(0), away from the clipped last step.
    for t in (0, 1, 17, 250, 500, 777, 990):
        assert sched.alphas_cumprod[t].item() == pytest.approx(_cosine_f(t + 1, T) / _cosine_f(0, T), rel=1e-12)


def test_cosine_betas_are_clipped_at_0_999():
    betas = cosine_beta_schedule(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas.max().item() == 0.999  # f(T) = 0 would give beta_T = 1
    assert betas[-2].item() < 0.999


def test_linear_betas_endpoints_and_spacing():
    betas = linear_beta_schedule(10)
    assert betas.dtype == torch.float64 and betas.shape == (10,)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert betas[3].item() == pytest.approx(1e-4 + 3 * (0.02 - 1e-4) / 9, rel=1e-12)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_alphas_cumprod_strictly_decreasing(name):
    abar = NoiseSchedule.from_name(name, T=1000).alphas_cumprod
    assert (abar[1:] < abar[:-1]).all()
    assert 0 < abar[-1] < abar[0] < 1


def test_derived_coefficients_match_hand_computation():
    T = 50
    sched = NoiseSchedule.from_name("linear", T=T)
    betas = [1e-4 + i * (0.02 - 1e-4) / (T - 1) for i in range(T)]
    abar = math.prod(1 - b for b in betas[:21])  # abar at t = 20
    abar_prev = math.prod(1 - b for b in betas[:20])
    assert sched.alphas_cumprod[20].item() == pytest.approx(abar, rel=1e-12)
    assert sched.alphas_cumprod_prev[20].item() == pytest.approx(abar_prev, rel=1e-12)
    assert sched.alphas_cumprod_prev[0].item() == 1.0
    assert sched.alphas[20].item() == pytest.approx(1 - betas[20], rel=1e-12)
    assert sched.sqrt_alphas_cumprod[20].item() == pytest.approx(math.sqrt(abar), rel=1e-12)
    assert sched.sqrt_one_minus_alphas_cumprod[20].item() == pytest.approx(math.sqrt(1 - abar), rel=1e-12)
    assert sched.log_snr[20].item() == pytest.approx(math.log(abar / (1 - abar)), rel=1e-10)
    assert sched.alpha_sigma(20) == pytest.approx((math.sqrt(abar), math.sqrt(1 - abar)), rel=1e-12)
    assert sched.half_log_snr(20) == pytest.approx(0.5 * math.log(abar / (1 - abar)), rel=1e-10)
    assert sched.num_timesteps == T


def test_timestep_minus_one_is_clean_data():
    sched = NoiseSchedule.from_name("cosine", T=100)
    assert sched.alpha_sigma(-1) == (1.0, 0.0)
    assert sched.half_log_snr(-1) == math.inf
    with pytest.raises(ValueError, match="outside"):
        sched.abar(100)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown noise schedule 'sigmoid'.*cosine.*linear"):
        NoiseSchedule.from_name("sigmoid")


def test_extract_gathers_and_broadcasts():
    a = torch.arange(10, dtype=torch.float64) * 0.5
    out = extract(a, torch.tensor([3, 0, 9]), (3, 4, 5, 6))
    assert out.shape == (3, 1, 1, 1)
    assert out.flatten().tolist() == [1.5, 0.0, 4.5]


def test_trailing_timesteps():
    assert spaced_timesteps(1000, 4) == [999, 749, 499, 249]
    assert spaced_timesteps(1000, 1) == [999]
    assert spaced_timesteps(10, 10) == list(range(9, -1, -1))
    assert spaced_timesteps(7, 3) == [6, 4, 1]  # round(7 - 7i/3) - 1
    for bad in (0, -3, 11):
        with pytest.raises(ValueError, match="steps must be in"):
            spaced_timesteps(10, bad)
