"""One stage of Imagen's cascade: a text-conditioned Efficient U-Net with EMA weights and its conditioning.

A stage owns its U-Net (and, when trainable, its text encoder) but no diffusion logic: it exposes its denoiser
(`TextToImageStage.denoiser`: U-Net + low-res input) and its text conditioning; training (`training_loss`) and
sampling (`sample`, classifier-free guidance) go through `imagen.diffusion`, composed by the task and by
`imagen.pipelines.TextToImagePipeline`. Frozen text encoders are kept out of the state dict, so a run's weights
hold only what the run trained.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from imagen.data.image_files import resize_images
from imagen.diffusion import (BETA_SCHEDULES, OBJECTIVES, NoiseSchedule, SamplingConfig, classifier_free_guidance,
                              composed_guidance, q_sample, randn)
from imagen.config import check_range
from imagen.errors import ConfigError, GenerationError
from imagen.models.unet import EfficientUNet, UNetConfig


@dataclass
class StageConfig:
    """A cascade stage: its U-Net, diffusion process, conditioning dropout, EMA and (SR) noise augmentation."""

    name: str = "base"  # base | sr1 | sr2 ...
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: str = "cosine"
    timesteps: int = 1000
    objective: str = "v"  # eps | v | x0
    min_snr_gamma: float | None = 5.0
    snr_floor: float | None = None  # x0-loss weight at least this (1.0: truncated SNR) so pure-noise steps still train
    cond_drop_prob: float = 0.1  # classifier-free guidance: text dropped for this share of training samples
    ema_decay: float = 0.995
    lowres_size: int | None = None  # SR stages: the resolution of the stage below
    aug_level_max: float = 0.5  # SR training: noise-augmentation level drawn uniformly in [0, max]
    text_encoder: dict[str, Any] = field(default_factory=dict)  # spec() of the text encoder
    # A guidance-distilled student (`imagen distill`): one U-Net call per step at a guidance scale in guidance_range.
    guidance_distilled: bool = False
    guidance_range: tuple[float, float] | None = None
    # A progressively distilled student (`imagen distill --steps N`): it samples with this sampler at this many
    # steps, the timestep grid it was distilled on (see `sampling`).
    distilled_steps: int | None = None
    distilled_sampler: str | None = None
    # The grounding loss's weight beside the denoising loss (tasks/text_to_image/grounding.py): cross-attention
    # taught where each named object is, from object masks; 0 trains without it.
    grounding_weight: float = 0.0

    def __post_init__(self):
        if isinstance(self.unet, dict):
            self.unet = UNetConfig(**self.unet)
        if self.guidance_range is not None:
            self.guidance_range = tuple(float(v) for v in self.guidance_range)
        check_range(f"{self.name}.timesteps", self.timesteps, 2, 100_000)
        check_range(f"{self.name}.grounding_weight", self.grounding_weight, 0, 1000, integer=False)
        for name in ("cond_drop_prob", "ema_decay", "aug_level_max"):
            check_range(f"{self.name}.{name}", getattr(self, name), 0, 1, integer=False)
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}; choose one of: {', '.join(OBJECTIVES)}")
        if self.schedule not in BETA_SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(BETA_SCHEDULES)}")
        if self.snr_floor is not None and not 0 < self.snr_floor <= (self.min_snr_gamma or float("inf")):
            raise ConfigError(f"snr_floor {self.snr_floor} must be in (0, min_snr_gamma={self.min_snr_gamma}]")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ConfigError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if self.unet.lowres_cond and not self.lowres_size:
            raise ConfigError(f"stage {self.name} is super-resolution but has no lowres_size")
        if self.guidance_distilled != self.unet.guidance_cond:
            raise ConfigError(f"stage {self.name}: guidance_distilled={self.guidance_distilled} needs "
                              f"unet.guidance_cond={self.guidance_distilled} (got {self.unet.guidance_cond})")
        if self.guidance_distilled:
            check_guidance_range(self.guidance_range, f"stage {self.name} guidance_range")
        if (self.distilled_steps is None) != (self.distilled_sampler is None):
            raise ConfigError(f"stage {self.name}: distilled_steps={self.distilled_steps} and distilled_sampler="
                              f"{self.distilled_sampler} are set together or not at all")
        if self.distilled_steps is not None:
            check_range(f"{self.name}.distilled_steps", self.distilled_steps, 1, self.timesteps)

    @property
    def is_sr(self) -> bool:
        return self.unet.lowres_cond

    def sampling(self, config: SamplingConfig) -> SamplingConfig:
        """The options this stage samples with: `config` with this stage's own steps when its `stage_steps` name it,
        except that a progressively distilled stage always takes the sampler (deterministic) and step count it was
        distilled for. Its student learnt to jump between the points of that one timestep grid, so another step
        count or sampler would only make worse pictures (naming another count for it is refused); the requested
        steps and sampler still apply to the cascade's other stages."""
        own = config.for_stage(self.name)
        if self.distilled_steps is None:
            return own
        named = dict(config.stage_steps).get(self.name)
        if named is not None and named != self.distilled_steps:
            raise GenerationError(f"stage {self.name} is progressively distilled to {self.distilled_steps} DDIM steps "
                                  f"and samples with exactly those; drop {self.name}={named} from the steps")
        return dataclasses.replace(own, sampler=self.distilled_sampler, steps=self.distilled_steps, eta=0.0)

    def check_guidance(self, guidance: float, negative: bool = False) -> None:
        """GenerationError when a guidance-distilled stage cannot sample at `guidance` (or with a negative prompt)."""
        if not self.guidance_distilled:
            return
        low, high = self.guidance_range
        if not low <= guidance <= high:
            raise GenerationError(f"stage {self.name} is guidance-distilled for guidance in [{low:g}, {high:g}], got "
                                  f"{guidance:g}; ask for one in that range")
        if negative:
            raise GenerationError(f"stage {self.name} is guidance-distilled: it folds the empty prompt into one call, "
                                  "so it takes no negative prompt; drop the negative prompt or use the undistilled run")


def check_guidance_range(value, what: str = "guidance range") -> tuple[float, float]:
    """(low, high) guidance scales with 0 <= low <= high, finite; a ConfigError naming the value otherwise."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {value!r} must be two numbers LOW,HIGH, e.g. 1,6") from None
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high):
        raise ConfigError(f"{what} {low:g},{high:g} must be two finite numbers with 0 <= LOW <= HIGH, e.g. 1,6")
    return low, high


class TextToImageStage(nn.Module):
    """U-Net + EMA copy + text encoder for one cascade stage."""

    def __init__(self, config: StageConfig, text_encoder=None):
        super().__init__()
        self.config = config
        self.unet = EfficientUNet(config.unet)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema_unet.eval()
        self.schedule = NoiseSchedule.from_name(config.schedule, config.timesteps)
        if text_encoder is not None and not getattr(text_encoder, "frozen", True):
            self.text_encoder = text_encoder  # trainable: a submodule, saved with the stage
        else:
            self.text_encoder = None
            self.__dict__["frozen_text_encoder"] = text_encoder  # kept out of parameters and state_dict

    def train(self, mode: bool = True):
        super().train(mode)
        self.ema_unet.eval()  # the EMA copy never runs dropout
        return self

    @property
    def encoder(self):
        return self.text_encoder if self.text_encoder is not None else self.__dict__.get("frozen_text_encoder")

    # --- conditioning -----------------------------------------------------------------------------

    def encode_text(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Condition tensors for a list of prompts: token states, their mask and the pooled embedding."""
        enc = self.encoder.encode(list(texts))
        device = next(self.unet.parameters()).device
        return {"text_states": enc.states.to(device), "text_mask": enc.mask.to(device), "text_embed": enc.pooled.to(device)}

    @staticmethod
    def drop_condition(cond: dict[str, torch.Tensor], drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """Replace the text of samples where `drop` is True by the null condition (no visible tokens, zero pooled)."""
        return {
            "text_states": cond["text_states"],
            "text_mask": cond["text_mask"] & ~drop[:, None],
            "text_embed": torch.where(drop[:, None], torch.zeros_like(cond["text_embed"]), cond["text_embed"]),
        }

    def null_condition(self, batch: int, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.drop_condition(like, torch.ones(batch, dtype=torch.bool, device=like["text_mask"].device))

    def augment_lowres(self, lowres: torch.Tensor, level: torch.Tensor, generator=None, noise=None) -> torch.Tensor:
        """Noise-conditioning augmentation (Imagen sec. 2.5): diffuse the low-res image to `level` in [0, 1]
        (with `noise`, or noise drawn from `generator`: one generator, or one per sample)."""
        t = (level * (self.config.timesteps - 1)).round().long()
        if noise is None:
            noise = randn(lowres.shape, generator, device=lowres.device, dtype=lowres.dtype)
        return q_sample(self.schedule, lowres, t, noise)

    def lowres_input(self, lowres: torch.Tensor, level: torch.Tensor, generator=None, noise=None) -> torch.Tensor:
        """The SR stage's extra input: the low-res image, noise-augmented, upsampled to the stage's size."""
        return resize_images(self.augment_lowres(lowres, level, generator, noise), self.config.unet.image_size)

    # --- the denoiser -------------------------------------------------------------------------------

    def denoiser(self, lowres: torch.Tensor | None = None, aug_level: float = 0.0, generator=None, use_ema: bool = True,
                 guidance: float | None = None):
        """The stage as a denoiser callable `(x_t, t, **cond) -> prediction` for `imagen.diffusion.sample`.

        A super-resolution stage takes the stage below's images `lowres` (B, C, s, s); they are noise-augmented
        to `aug_level` here, once (drawing from `generator` before the sampler does), and upsampled. A
        guidance-distilled stage takes the guidance scale its predictions are for.
        """
        unet = self.ema_unet if use_ema else self.unet
        c = self.config
        extra = {}
        if c.is_sr:
            if lowres is None:
                raise ValueError(f"stage {c.name} needs the low-resolution images of the stage below")
            device = next(unet.parameters()).device
            level = torch.full((lowres.shape[0],), float(aug_level), device=device)
            extra = {"lowres_image": self.lowres_input(lowres.to(device), level, generator), "lowres_noise_level": level}
        scale = {}
        if c.guidance_distilled:
            if guidance is None:
                raise ValueError(f"stage {c.name} is guidance-distilled: pass the guidance scale")
            scale = {"guidance": torch.tensor(float(guidance), device=next(unet.parameters()).device)}

        def denoise(x_t, t, **cond):
            t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
            # Classifier-free guidance stacks the batch (conditional, then unconditional): repeat the low-res input.
            more = {k: v.repeat(x_t.shape[0] // v.shape[0], *([1] * (v.dim() - 1))) for k, v in extra.items()}
            return unet(x_t, t, **cond, **more, **scale).float()

        return denoise

    def guided_denoiser(self, cond: dict[str, torch.Tensor], guidance: float, lowres: torch.Tensor | None = None,
                        aug_level: float = 0.0, generator=None, negative_cond: dict[str, torch.Tensor] | None = None,
                        part_weights: torch.Tensor | None = None):
        """The denoiser at classifier-free guidance scale `guidance` for prompts encoded as `cond`: two U-Net branches
        per call (Ho & Salimans 2022; none at scale 1), or one call for a guidance-distilled stage.

        With `part_weights` (K, B), `cond` holds K parts of each of the B prompts (part-major) and the denoiser is
        their conjunction, each part guided at `guidance` times its weight (`composed_guidance`)."""
        c = self.config
        if part_weights is not None:
            if c.guidance_distilled:
                raise ValueError(f"stage {c.name} is guidance-distilled: it has no conditional branch per part to compose")
            B = part_weights.shape[1]
            first = {k: v[:B] for k, v in cond.items()}
            return composed_guidance(self.denoiser(lowres, aug_level=aug_level, generator=generator),
                                     self.null_condition(B, first), weights=guidance * part_weights,
                                     negative_cond=negative_cond)
        if c.guidance_distilled:
            c.check_guidance(guidance, negative=negative_cond is not None)
            return self.denoiser(lowres, aug_level=aug_level, generator=generator, guidance=guidance)
        denoiser = self.denoiser(lowres, aug_level=aug_level, generator=generator)
        if guidance != 1.0:
            B = cond["text_mask"].shape[0]
            denoiser = classifier_free_guidance(denoiser, self.null_condition(B, cond), scale=guidance,
                                                negative_cond=negative_cond)
        return denoiser

    @torch.no_grad()
    def update_ema(self, step: int | None = None) -> None:
        """ema <- decay * ema + (1 - decay) * online, for every parameter and buffer.

        With `step` (optimiser steps taken), the decay warms up as min(ema_decay, (1 + step) / (10 + step)):
        without it a short run's EMA still holds a large share of the random initial weights
        (0.995 ** 250 = 29 % after 250 steps), which samples as noise.
        """
        decay = self.config.ema_decay if step is None else min(self.config.ema_decay, (1 + step) / (10 + step))
        # One multi-tensor update (a few kernel launches on a GPU instead of one per parameter).
        torch._foreach_lerp_(list(self.ema_unet.parameters()), [p.detach() for p in self.unet.parameters()], 1.0 - decay)
        for ema_b, b in zip(self.ema_unet.buffers(), self.unet.buffers()):
            ema_b.copy_(b)


def stage_config_to_json(config: StageConfig) -> dict[str, Any]:
    """The stage config as plain JSON values (tuples become lists), as config.json stores it."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
