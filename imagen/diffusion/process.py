"""The forward diffusion process, conversions between eps / x0 / v, and the training loss; owns no network."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from imagen.config import OBJECTIVE_NAMES
from imagen.diffusion.schedules import NoiseSchedule, extract

OBJECTIVES = OBJECTIVE_NAMES


def _alpha_sigma(schedule: NoiseSchedule, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # (B, 1, ..., 1) coefficients in x's dtype and device.
    alpha = extract(schedule.sqrt_alphas_cumprod, t, x.shape).to(x)
    sigma = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x.shape).to(x)
    return alpha, sigma


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0) (Ho et al. 2020, eq. 4): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    alpha, sigma = _alpha_sigma(schedule, t, x0)
    return alpha * x0 + sigma * noise


def predict_x0_from_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Invert eq. 4 of Ho et al. 2020 for x0: x0 = (x_t - sigma_t eps) / alpha_t."""
    alpha, sigma = _alpha_sigma(schedule, t, x_t)
    return (x_t - sigma * eps) / alpha


def predict_eps_from_x0(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Invert eq. 4 of Ho et al. 2020 for eps: eps = (x_t - alpha_t x0) / sigma_t."""
    alpha, sigma = _alpha_sigma(schedule, t, x_t)
    return (x_t - alpha * x0) / sigma


def v_target(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Velocity target v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022, "Progressive Distillation", sec. 4)."""
    alpha, sigma = _alpha_sigma(schedule, t, x0)
    return alpha * noise - sigma * x0


def predict_x0_from_v(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x0 = alpha_t x_t - sigma_t v, since alpha^2 + sigma^2 = 1 (Salimans & Ho 2022)."""
    alpha, sigma = _alpha_sigma(schedule, t, x_t)
    return alpha * x_t - sigma * v


def predict_eps_from_v(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """eps = sigma_t x_t + alpha_t v (Salimans & Ho 2022)."""
    alpha, sigma = _alpha_sigma(schedule, t, x_t)
    return sigma * x_t + alpha * v


# Seeds of per-sample noise streams: sample k of a request draws from seed + k * this odd 64-bit constant (the
# golden ratio's, as in splitmix64), so sample 0 keeps the plain seed and two seeds' streams never meet in practice.
_SEED_STRIDE = 0x9E3779B97F4A7C15


def sample_generators(seed: int, indices, device=None) -> list[torch.Generator]:
    """One generator per sample index, seeded from (seed, index): a sample's noise is then its own, whatever batch
    it is drawn in (sample 0 draws exactly what a single generator seeded with `seed` would)."""
    return [torch.Generator(device=device).manual_seed((seed + int(k) * _SEED_STRIDE) % 2**64) for k in indices]


def randn(shape, generator=None, *, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise of `shape`; `generator` is one generator, None, or a list of one per row of dim 0."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def uniform_timesteps(batch: int, T: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Draw integer timesteps uniformly from {0, ..., T-1} (Ho et al. 2020, Algorithm 1)."""
    return torch.randint(0, T, (batch,), generator=generator, device=device)


def min_snr_weight(snr: torch.Tensor, gamma: float | None, objective: str, floor: float | None = None) -> torch.Tensor:
    """Loss weight that makes the x0-loss weight clamp(SNR, floor, gamma), expressed for each prediction target.

    gamma alone is Min-SNR-gamma (Hang et al. 2023, eq. 9 and sec. 3.4): it caps the weight of the nearly clean
    timesteps. floor alone is the truncated-SNR weighting max(SNR, floor) (Salimans & Ho 2022, sec. 4, with floor
    1): it keeps the nearly pure-noise timesteps, where a picture's layout is decided, from weighing almost
    nothing, as they do under the eps-loss and under Min-SNR (weight ~SNR there)."""
    weight = snr
    if gamma is not None:
        weight = weight.clamp(max=gamma)
    if floor is not None:
        weight = weight.clamp(min=floor)
    if objective == "eps":  # the eps-loss is SNR times the x0-loss, so divide SNR back out
        return weight / snr
    if objective == "v":  # the v-loss is (SNR + 1) times the x0-loss
        return weight / (snr + 1)
    if objective == "x0":
        return weight
    raise ValueError(f"unknown objective {objective!r}; choose one of {list(OBJECTIVES)}")


def training_loss(
    denoiser: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    t: torch.Tensor,
    cond: dict | None = None,
    *,
    schedule: NoiseSchedule,
    objective: str = "eps",
    min_snr_gamma: float | None = None,
    snr_floor: float | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Simple diffusion loss (Ho et al. 2020, eq. 14) for an eps, v or x0 target; optional SNR weights (see
    `min_snr_weight`: Min-SNR-gamma caps the x0-loss weight at gamma, `snr_floor` lifts it to at least the floor)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {list(OBJECTIVES)}")
    noise = torch.randn_like(x0) if noise is None else noise
    x_t = q_sample(schedule, x0, t, noise)
    pred = denoiser(x_t, t, **(cond or {}))
    target = {"eps": noise, "x0": x0}.get(objective)
    if target is None:
        target = v_target(schedule, x0, noise, t)
    return weighted_mse(pred, target, t, schedule=schedule, objective=objective, min_snr_gamma=min_snr_gamma,
                        snr_floor=snr_floor)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, *, schedule: NoiseSchedule, objective: str,
                 min_snr_gamma: float | None = None, snr_floor: float | None = None) -> torch.Tensor:
    """Mean over the batch of each sample's squared error, weighted by `min_snr_weight` at its timestep."""
    loss = F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)  # (B,)
    if min_snr_gamma is not None or snr_floor is not None:
        snr = schedule.log_snr.to(t.device)[t].exp()  # (B,)
        loss = loss * min_snr_weight(snr, min_snr_gamma, objective, snr_floor).to(loss)
    return loss.mean()
