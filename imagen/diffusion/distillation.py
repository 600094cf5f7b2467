"""Distillation losses for fewer network calls per sampling step; they own no network, like `training_loss`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from imagen.diffusion.guidance import classifier_free_guidance
from imagen.diffusion.process import q_sample, weighted_mse
from imagen.diffusion.samplers import model_output_to_x0_eps
from imagen.diffusion.schedules import NoiseSchedule, spaced_timesteps


def guidance_distillation_loss(
    student: Callable[..., torch.Tensor],
    teacher: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    t: torch.Tensor,
    cond: dict,
    null_cond: dict,
    guidance: torch.Tensor,
    *,
    schedule: NoiseSchedule,
    objective: str,
    min_snr_gamma: float | None = None,
    snr_floor: float | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models", stage 1, eq. 6).

    The student, given the guidance scale w (B,) as an input, regresses in one call the teacher's classifier-free
    guided prediction uncond + w * (cond - uncond) at x_t ~ q(x_t | x0): in the teacher's prediction space
    (`objective`: eps, v or x0, where guidance is the same affine mix), weighted per timestep as training was. The
    teacher runs without gradients.
    """
    noise = torch.randn_like(x0) if noise is None else noise
    x_t = q_sample(schedule, x0, t, noise)
    scale = guidance.view(-1, *([1] * (x0.dim() - 1))).to(x0)  # (B, 1, 1, 1)
    with torch.no_grad():
        target = classifier_free_guidance(teacher, null_cond, scale=scale)(x_t, t, **cond)
    pred = student(x_t, t, guidance=guidance, **cond)
    return weighted_mse(pred, target.to(pred.dtype), t, schedule=schedule, objective=objective,
                        min_snr_gamma=min_snr_gamma, snr_floor=snr_floor)


def progressive_timesteps(T: int, steps: int) -> list[int]:
    """The student's timestep grid of a progressive distillation to `steps` steps, clean data (-1) last.

    It is the grid DDIM samples on (`spaced_timesteps`, "trailing", then one step to t = -1), so a student distilled
    here samples with `imagen.diffusion.sample` at `steps` DDIM steps on exactly these points. The teacher's grid of
    2 * steps holds every point of it (index 2i of the teacher's is index i of the student's), and its odd points are
    the teacher's midpoints t'.
    """
    return spaced_timesteps(T, steps) + [-1]


def _alpha_sigma_at(schedule: NoiseSchedule, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # (B, 1, ..., 1) alpha_t, sigma_t in float64, t = -1 allowed (clean data: alpha = 1, sigma = 0).
    abar = torch.cat([schedule.alphas_cumprod.new_ones(1), schedule.alphas_cumprod]).to(x.device)[t.long() + 1]
    shape = (-1, *([1] * (x.dim() - 1)))
    return abar.sqrt().view(shape), (1 - abar).clamp(min=0).sqrt().view(shape)


def ddim_step(teacher_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, *,
              schedule: NoiseSchedule, objective: str, threshold: str, percentile: float) -> torch.Tensor:
    """One deterministic DDIM step t -> t_prev per sample (Song et al. 2021, eq. 12 with eta = 0), the prediction
    thresholded and eps re-derived from it as `sample` does (`model_output_to_x0_eps`); t_prev = -1 is clean data."""
    pred_x0, eps = model_output_to_x0_eps(schedule, teacher_output, x_t, t, objective, threshold, percentile)
    alpha, sigma = _alpha_sigma_at(schedule, t_prev, x_t)
    return (alpha * pred_x0.double() + sigma * eps.double()).to(x_t.dtype)


def progressive_distillation_target(
    teacher: Callable[..., torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_mid: torch.Tensor,
    t_next: torch.Tensor,
    cond: dict,
    *,
    schedule: NoiseSchedule,
    objective: str,
    threshold: str,
    percentile: float,
) -> torch.Tensor:
    """The student's target in its prediction space (Salimans & Ho 2022, "Progressive Distillation", Algorithm 2).

    The teacher takes two DDIM steps t -> t_mid -> t_next (its thresholding as at sampling); the target x~ is the x0
    prediction with which one DDIM step t -> t_next lands on the same x_{t_next}:
        x_next = alpha'' x~ + (sigma'' / sigma_t)(x_t - alpha_t x~)
        =>  x~ = (x_next - (sigma'' / sigma_t) x_t) / (alpha'' - (sigma'' / sigma_t) alpha_t)
    (t_next = -1: x~ = x_next). It is returned as eps, v or x0 (`objective`), consistent with x~ at x_t. One step of
    the student with it reproduces the teacher's two as long as the sampler's thresholding leaves x~ unchanged
    (x~ within [-1, 1] for static or dynamic thresholding). Per-sample timesteps; no gradients.
    """
    with torch.no_grad():
        x_mid = ddim_step(teacher(x_t, t, **cond).to(x_t.dtype), x_t, t, t_mid, schedule=schedule, objective=objective,
                          threshold=threshold, percentile=percentile)
        x_next = ddim_step(teacher(x_mid, t_mid, **cond).to(x_t.dtype), x_mid, t_mid, t_next, schedule=schedule,
                           objective=objective, threshold=threshold, percentile=percentile)
        alpha, sigma = _alpha_sigma_at(schedule, t, x_t)
        alpha_next, sigma_next = _alpha_sigma_at(schedule, t_next, x_t)
        ratio = sigma_next / sigma
        x0 = (x_next.double() - ratio * x_t.double()) / (alpha_next - ratio * alpha)  # x~
        if objective == "x0":
            target = x0
        else:
            eps = (x_t.double() - alpha * x0) / sigma
            target = eps if objective == "eps" else alpha * eps - sigma * x0  # v = alpha eps - sigma x0
    return target.to(x_t.dtype)


def progressive_distillation_loss(
    student: Callable[..., torch.Tensor],
    teacher: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    step: torch.Tensor,
    cond: dict,
    *,
    steps: int,
    schedule: NoiseSchedule,
    objective: str,
    threshold: str,
    percentile: float,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Progressive distillation to `steps` DDIM steps (Salimans & Ho 2022, Algorithm 2) at the student's step
    indices `step` (B,) in [0, steps): x_t ~ q(x_t | x0) at the student's grid point t = grid[step], the target from
    the teacher's two steps on its grid of 2 * steps (`progressive_distillation_target`), and the squared error
    weighted by truncated SNR, max(SNR_t, 1) in x0 terms (the paper's sec. 4: the nearly pure-noise steps, where a
    distilled student decides the whole picture in few steps, keep weight 1 instead of ~SNR)."""
    teacher_grid = torch.tensor(progressive_timesteps(schedule.num_timesteps, 2 * steps), device=x0.device)
    t, t_mid, t_next = (teacher_grid[2 * step + k] for k in range(3))
    noise = torch.randn_like(x0) if noise is None else noise
    x_t = q_sample(schedule, x0, t, noise)
    target = progressive_distillation_target(teacher, x_t, t, t_mid, t_next, cond, schedule=schedule,
                                             objective=objective, threshold=threshold, percentile=percentile)
    pred = student(x_t, t, **cond)
    return weighted_mse(pred, target.to(pred.dtype), t, schedule=schedule, objective=objective, snr_floor=1.0)
