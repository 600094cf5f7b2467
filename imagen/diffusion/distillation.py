"""Distillation losses for fewer network calls per sampling step; they own no network, like `training_loss`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from imagen.diffusion.guidance import classifier_free_guidance
from imagen.diffusion.process import q_sample, weighted_mse
from imagen.diffusion.schedules import NoiseSchedule


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
