"""Noise schedules as pure functions, and the frozen table of coefficients the process and samplers read."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from imagen.config import SCHEDULE_NAMES

# Timestep convention, used everywhere in imagen.diffusion: integer t in {0, ..., T-1} indexes the noisy latents,
# so alphas_cumprod[t] is abar of DDPM step t+1; t = -1 stands for the clean data (abar = 1, sigma = 0).


def linear_beta_schedule(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linearly increasing betas (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", sec. 4)."""
    if T <= 0:
        raise ValueError(f"number of timesteps T must be positive, got {T}")
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_beta_schedule(T: int, s: float = 0.008) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, "Improved DDPM", eq. 17), betas clipped at 0.999."""
    if T <= 0:
        raise ValueError(f"number of timesteps T must be positive, got {T}")
    steps = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((steps / T + s) / (1 + s) * math.pi / 2) ** 2  # (17): f(t) = cos^2(((t/T + s)/(1 + s)) pi/2)
    alphas_cumprod = f / f[0]
    # Clipping keeps the last step from being a division by ~0 (abar_T = 0 exactly).
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=0.999)


def extract(a: torch.Tensor, t: torch.Tensor, x_shape) -> torch.Tensor:
    """Gather a[t] per sample and reshape to (B, 1, ..., 1) so it broadcasts against x of shape x_shape."""
    out = a.to(t.device)[t.long()]  # (B,)
    return out.reshape(t.shape[0], *([1] * (len(x_shape) - 1)))


BETA_SCHEDULES = dict(zip(SCHEDULE_NAMES, (linear_beta_schedule, cosine_beta_schedule)))


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """Per-timestep coefficients of the DDPM forward process (Ho et al. 2020, eq. 4); float64, no weights."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    log_snr: torch.Tensor  # lambda_t = log(alpha_t^2 / sigma_t^2), Kingma et al. 2021

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> NoiseSchedule:
        """Derive every coefficient from a 1-D tensor of betas."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(f"betas must be a 1-D tensor with values in (0, 1), got shape {tuple(betas.shape)}")
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        return cls(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]]),
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1 - alphas_cumprod).sqrt(),
            log_snr=alphas_cumprod.log() - torch.log1p(-alphas_cumprod),
        )

    @classmethod
    def from_name(cls, name: str, T: int = 1000) -> NoiseSchedule:
        """Build a schedule by name: "cosine" or "linear"."""
        if name not in BETA_SCHEDULES:
            raise ValueError(f"unknown noise schedule {name!r}; choose one of {sorted(BETA_SCHEDULES)}")
        return cls.from_betas(BETA_SCHEDULES[name](T))

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def abar(self, t: int) -> float:
        """alphas_cumprod at integer timestep t as a Python float; 1.0 for t = -1 (clean data)."""
        if not -1 <= t < self.num_timesteps:
            raise ValueError(f"timestep {t} is outside [-1, {self.num_timesteps - 1}]")
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def alpha_sigma(self, t: int) -> tuple[float, float]:
        """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)) at integer timestep t; (1, 0) for t = -1."""
        abar = self.abar(t)
        return math.sqrt(abar), math.sqrt(1.0 - abar)

    def half_log_snr(self, t: int) -> float:
        """Half log-SNR, lambda_t = log(alpha_t / sigma_t) (Lu et al. 2022); +inf for t = -1."""
        alpha, sigma = self.alpha_sigma(t)
        return math.inf if sigma == 0 else math.log(alpha / sigma)


def spaced_timesteps(T: int, steps: int) -> list[int]:
    """"Trailing" spacing: `steps` timesteps evenly spaced from T-1 down to T/steps - 1 (Lin et al. 2023, table 2)."""
    if not 0 < steps <= T:
        raise ValueError(f"steps must be in [1, {T}] for a {T}-step schedule, got {steps}")
    # Starting at T-1 begins sampling at the noisiest level the model was trained on ("leading" spacing skips it).
    # The samplers then step from the last timestep straight to clean data (t = -1); also evaluating the model at
    # t = 0 would make that final step tiny but the one before it huge in log-SNR, which throws DPM-Solver++(2M)'s
    # extrapolation off (sample std off by 10% at 20 steps on Gaussian data). steps = T gives every timestep.
    return [round(T - i * T / steps) - 1 for i in range(steps)]
