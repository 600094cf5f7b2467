"""Diffusion core for Imagen (Saharia et al. 2022): noise schedules, forward process and loss, guidance, samplers.

Nothing here owns a network: a denoiser is any callable `denoiser(x_t, t, **cond) -> prediction`. Sampling
options travel as one `SamplingConfig` (validated once) into `sample`, the one denoising loop.
"""

from imagen.diffusion.distillation import (
    ddim_step,
    guidance_distillation_loss,
    progressive_distillation_loss,
    progressive_distillation_target,
    progressive_timesteps,
)
from imagen.diffusion.guidance import classifier_free_guidance, composed_guidance
from imagen.diffusion.process import (
    OBJECTIVES,
    min_snr_weight,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_sample,
    randn,
    sample_generators,
    training_loss,
    uniform_timesteps,
    weighted_mse,
    v_target,
)
from imagen.diffusion.samplers import (
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    DPMSolverPP3MSampler,
    Sampler,
    UniPCSampler,
    SamplingConfig,
    check_sampler,
    make_sampler,
    model_output_to_x0_eps,
    sample,
)
from imagen.diffusion.schedules import (
    BETA_SCHEDULES,
    NoiseSchedule,
    cosine_beta_schedule,
    extract,
    linear_beta_schedule,
    spaced_timesteps,
)
from imagen.diffusion.thresholding import THRESHOLDS, apply_threshold, dynamic_threshold, static_threshold

__all__ = [
    "BETA_SCHEDULES",
    "NoiseSchedule",
    "linear_beta_schedule",
    "cosine_beta_schedule",
    "extract",
    "spaced_timesteps",
    "OBJECTIVES",
    "q_sample",
    "randn",
    "sample_generators",
    "predict_x0_from_eps",
    "predict_eps_from_x0",
    "v_target",
    "predict_x0_from_v",
    "predict_eps_from_v",
    "min_snr_weight",
    "training_loss",
    "weighted_mse",
    "uniform_timesteps",
    "classifier_free_guidance",
    "composed_guidance",
    "guidance_distillation_loss",
    "progressive_distillation_loss",
    "progressive_distillation_target",
    "progressive_timesteps",
    "ddim_step",
    "THRESHOLDS",
    "static_threshold",
    "dynamic_threshold",
    "apply_threshold",
    "SAMPLERS",
    "Sampler",
    "SamplingConfig",
    "check_sampler",
    "DDPMSampler",
    "DDIMSampler",
    "DPMSolverPP2MSampler",
    "DPMSolverPP3MSampler",
    "UniPCSampler",
    "make_sampler",
    "model_output_to_x0_eps",
    "sample",
]
