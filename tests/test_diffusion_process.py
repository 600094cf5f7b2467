"""Forward process, eps / x0 / v conversions and the (Min-SNR weighted) training loss, by hand."""

import math

import pytest
import torch

from imagen.diffusion import (
    NoiseSchedule,
    min_snr_weight,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_sample,
    training_loss,
    uniform_timesteps,
    v_target,
)

SCHED = NoiseSchedule.from_name("cosine", T=1000)
T_IDX = torch.tensor([0, 123, 500, 998])


def _abar(t):
    # Cosine schedule, eq. 17 of Nichol & Dhariwal 2021; index t is step t+1 (t <= 998 is unclipped).
    f = lambda u: math.cos(((u / 1000) + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return f(t + 1) / f(0)


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 5, 2, generator=g, dtype=dtype), torch.randn(4, 3, 5, 2, generator=g, dtype=dtype)


def test_q_sample_is_eq_4():
    x0, noise = _data()
    x_t = q_sample(SCHED, x0, T_IDX, noise)
    for i, t in enumerate(T_IDX.tolist()):
        expected = math.sqrt(_abar(t)) * x0[i] + math.sqrt(1 - _abar(t)) * noise[i]
        torch.testing.assert_close(x_t[i], expected, rtol=1e-9, atol=1e-12)


def test_q_sample_keeps_float32():
    x0, noise = _data(torch.float32)
    assert q_sample(SCHED, x0, T_IDX, noise).dtype == torch.float32


def test_v_target_by_hand():
    x0, noise = _data()
    v = v_target(SCHED, x0, noise, T_IDX)
    for i, t in enumerate(T_IDX.tolist()):
        expected = math.sqrt(_abar(t)) * noise[i] - math.sqrt(1 - _abar(t)) * x0[i]
        torch.testing.assert_close(v[i], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conversions_round_trip(dtype):
    x0, noise = _data(dtype)
    t = torch.tensor([0, 123, 500, 900])  # float32 x0-from-eps degrades as alpha -> 0, so stop at 900
    x_t = q_sample(SCHED, x0, t, noise)
    v = v_target(SCHED, x0, noise, t)
    tol = dict(rtol=0, atol=1e-6 if dtype == torch.float64 else 2e-5)
    torch.testing.assert_close(predict_x0_from_eps(SCHED, x_t, t, noise), x0, **tol)
    torch.testing.assert_close(predict_eps_from_x0(SCHED, x_t, t, x0), noise, **tol)
    torch.testing.assert_close(predict_x0_from_v(SCHED, x_t, t, v), x0, **tol)
    torch.testing.assert_close(predict_eps_from_v(SCHED, x_t, t, v), noise, **tol)


def test_uniform_timesteps_range_and_seed():
    t = uniform_timesteps(5000, 7, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 6
    assert torch.equal(t, uniform_timesteps(5000, 7, generator=torch.Generator().manual_seed(0)))


class ConstDenoiser:
    """Returns a fixed tensor and remembers what it was called with."""

    def __init__(self, out):
        self.out, self.calls = out, []

    def __call__(self, x_t, t, **cond):
        self.calls.append((x_t, t, cond))
        return self.out


@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
@pytest.mark.parametrize("gamma,floor", [(None, None), (5.0, None), (None, 1.0), (5.0, 1.0)])
def test_training_loss_is_hand_weighted_mse(objective, gamma, floor):
    x0, noise = _data()
    pred = torch.full_like(x0, 0.25)
    den = ConstDenoiser(pred)
    cond = {"text_embed": torch.ones(4, 6)}
    loss = training_loss(den, x0, T_IDX, cond, schedule=SCHED, objective=objective, min_snr_gamma=gamma,
                         snr_floor=floor, noise=noise)

    (x_t, t_seen, cond_seen), = den.calls
    assert torch.equal(t_seen, T_IDX) and torch.equal(cond_seen["text_embed"], cond["text_embed"])
    expected = 0.0
    for i, t in enumerate(T_IDX.tolist()):
        a, s = math.sqrt(_abar(t)), math.sqrt(1 - _abar(t))
        torch.testing.assert_close(x_t[i], a * x0[i] + s * noise[i])
        target = {"eps": noise[i], "x0": x0[i], "v": a * noise[i] - s * x0[i]}[objective]
        mse = ((pred[i] - target) ** 2).mean().item()
        snr = _abar(t) / (1 - _abar(t))
        if gamma is None and floor is None:
            w = 1.0
        else:  # Hang et al. 2023: min(SNR, g)/SNR for eps, min(SNR, g)/(SNR + 1) for v, min(SNR, g) for x0;
            # the floor lifts the x0 weight to max(., floor) first (Salimans & Ho 2022's truncated SNR for floor 1)
            x0_w = max(min(snr, gamma if gamma is not None else math.inf), floor if floor is not None else 0.0)
            w = {"eps": x0_w / snr, "v": x0_w / (snr + 1), "x0": x0_w}[objective]
        expected += w * mse / 4
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_min_snr_weight_clips_only_high_snr():
    snr = torch.tensor([0.5, 5.0, 50.0], dtype=torch.float64)
    assert min_snr_weight(snr, 5.0, "eps").tolist() == pytest.approx([1.0, 1.0, 0.1])
    assert min_snr_weight(snr, 5.0, "x0").tolist() == pytest.approx([0.5, 5.0, 5.0])


def test_snr_floor_keeps_pure_noise_steps_weighted():
    snr = torch.tensor([0.001, 0.5, 5.0, 50.0], dtype=torch.float64)
    # Min-SNR alone: a v-loss weight of SNR/(SNR+1), about 0.001 at SNR 0.001 -- those steps barely train.
    assert min_snr_weight(snr, 5.0, "v").tolist() == pytest.approx([0.001 / 1.001, 0.5 / 1.5, 5 / 6, 5 / 51])
    # With floor 1 the x0 weight is clamp(SNR, 1, 5): v-loss weight 1/(SNR+1) below SNR 1, unchanged above.
    assert min_snr_weight(snr, 5.0, "v", floor=1.0).tolist() == pytest.approx([1 / 1.001, 1 / 1.5, 5 / 6, 5 / 51])
    assert min_snr_weight(snr, None, "x0", floor=1.0).tolist() == pytest.approx([1.0, 1.0, 5.0, 50.0])


def test_training_loss_rejects_unknown_objective():
    x0, noise = _data()
    with pytest.raises(ValueError, match=r"unknown objective 'score'.*eps.*v.*x0"):
        training_loss(ConstDenoiser(x0), x0, T_IDX, schedule=SCHED, objective="score", noise=noise)


def test_training_loss_backpropagates():
    x0, _ = _data(torch.float32)
    w = torch.zeros(1, requires_grad=True)
    loss = training_loss(lambda x_t, t: w * x_t, x0, T_IDX, schedule=SCHED)
    loss.backward()
    assert w.grad is not None and w.grad.abs().item() > 0
