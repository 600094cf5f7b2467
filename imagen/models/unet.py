"""Imagen's Efficient U-Net (Saharia et al. 2022, Appendix B, Fig. A.30): the text-conditioned denoiser.

Reads top to bottom: the config and its presets, helpers, leaf layers (resampling, residual block, attention
block), the down and up levels, the model. What makes the U-Net "efficient" in the paper, and here:

- more residual blocks at the low resolutions (`num_res_blocks` per level), where convolutions are cheap;
- the down path downsamples *before* a level's convolutions and the up path upsamples *after* them, so
  every convolution of a level runs at that level's (smaller) resolution;
- residual sums and the U-Net skip connections are scaled by 1/sqrt(2).

Conditioning: the timestep, the pooled text embedding and (super-resolution stages) the noise-augmentation
level of the low-resolution image (and, with `text_pool_queries`, an attention pool over the token states) are
summed into one vector that modulates every residual block (FiLM);
the per-token text states are attended to by cross-attention at the levels named in `attn_levels` (with
self-attention) and `cross_attn_levels` (cross-attention alone, without the costly self-attention over many
pixels; on Shapes, adding it at the base stage's 16x16 level measured worse, so no default uses it).
A guidance-distilled student (`guidance_cond`) also adds an embedding of the classifier-free guidance scale to that
vector (Meng et al. 2023, "On Distillation of Guided Diffusion Models", sec. 4.1), so one call predicts what the
guided teacher's two branches would.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagen.config import MAX_DIM, MAX_HEADS, MAX_IMAGE_SIZE, ConfigError, check_range
from imagen.models.layers import Attention

# Imagen scales skip connections by 1/sqrt(2): a sum of two unit-variance branches stays unit-variance.
SKIP_SCALE = 2**-0.5


@dataclass
class UNetConfig:
    """One U-Net stage of the cascade: the 32x32 base model or a super-resolution stage."""

    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    dim: int = 64  # channels of the first level; level i has dim * dim_mults[i]
    dim_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: tuple[int, ...] = (1, 2, 2)  # per level: more blocks at low resolution (Efficient U-Net)
    attn_levels: tuple[bool, ...] = (False, True, True)  # self- + cross-attention after a level's blocks
    cross_attn_levels: tuple[bool, ...] | None = None  # cross-attention only, where attn_levels is False
    num_heads: int = 4
    text_dim: int = 384  # width of the text encoder's token states
    cond_dim: int | None = None  # width of the pooled text embedding; None = text_dim
    time_dim: int | None = None  # width of the conditioning vector; None = 4 * dim
    dropout: float = 0.0
    lowres_cond: bool = False  # super-resolution stage: conditioned on an upsampled low-resolution image
    groups: int = 8  # GroupNorm groups
    guidance_cond: bool = False  # conditioned on the guidance scale (a guidance-distilled student)
    text_pool_queries: int = 0  # > 0: an attention pool with this many learned queries over the token states (Imagen)

    def __post_init__(self):
        # JSON round-trips turn tuples into lists.
        self.dim_mults = tuple(self.dim_mults)
        self.num_res_blocks = tuple(self.num_res_blocks)
        self.attn_levels = tuple(bool(a) for a in self.attn_levels)
        if self.cross_attn_levels is not None:
            self.cross_attn_levels = tuple(bool(a) for a in self.cross_attn_levels)
        for name, hi in dict(image_size=MAX_IMAGE_SIZE, in_channels=16, out_channels=16, dim=MAX_DIM, num_heads=MAX_HEADS,
                             text_dim=MAX_DIM, groups=MAX_DIM).items():
            check_range(f"unet.{name}", getattr(self, name), 1, hi)
        check_range("unet.text_pool_queries", self.text_pool_queries, 0, 64)
        for name in ("cond_dim", "time_dim"):
            if getattr(self, name) is not None:
                check_range(f"unet.{name}", getattr(self, name), 1, 4 * MAX_DIM)
        check_range("unet.dropout", self.dropout, 0, 1, integer=False)
        check_range("unet.levels (entries of dim_mults)", len(self.dim_mults), 1, 8)
        for name in ("dim_mults", "num_res_blocks"):
            for value in getattr(self, name):
                check_range(f"each of unet.{name}", value, 1, 64)
        self.cond_dim = self.cond_dim or self.text_dim
        self.time_dim = self.time_dim or 4 * self.dim
        levels = len(self.dim_mults)
        if levels == 0:
            raise ConfigError("dim_mults must name at least one level")
        if len(self.num_res_blocks) != levels:
            raise ConfigError(f"num_res_blocks {self.num_res_blocks} has {len(self.num_res_blocks)} entries, dim_mults has {levels}")
        if len(self.attn_levels) != levels:
            raise ConfigError(f"attn_levels {self.attn_levels} has {len(self.attn_levels)} entries, dim_mults has {levels}")
        if self.cross_attn_levels is not None and len(self.cross_attn_levels) != levels:
            raise ConfigError(f"cross_attn_levels {self.cross_attn_levels} has {len(self.cross_attn_levels)} entries, dim_mults has {levels}")
        if self.image_size % 2 ** (levels - 1):
            raise ConfigError(f"image size {self.image_size} is not a multiple of {2 ** (levels - 1)} ({levels} levels)")
        for ch in self.channels:
            if ch % self.groups:
                raise ConfigError(f"level width {ch} is not divisible by groups {self.groups}")
            if ch % self.num_heads:
                raise ConfigError(f"level width {ch} is not divisible by num_heads {self.num_heads}")
        if any(n < 1 for n in self.num_res_blocks):
            raise ConfigError(f"num_res_blocks {self.num_res_blocks} must be >= 1 at every level")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def channels(self) -> tuple[int, ...]:
        """Width of each level, shallow to deep."""
        return tuple(self.dim * m for m in self.dim_mults)

    def attention_kind(self, level: int) -> str | None:
        """What follows a level's blocks: "full" (self- + cross-attention), "cross" (cross-attention only) or None."""
        if self.attn_levels[level]:
            return "full"
        return "cross" if self.cross_attn_levels and self.cross_attn_levels[level] else None


# Named presets: one table. "base16" and "sr32" are the default cascade for the built-in worlds, sized for a CPU
# (a 16x16 base and a 16 -> 32 super-resolution); "base32" (~4.05M parameters) is sized like imagen-pytorch's
# ~3.9M 32x32 reference, its extra blocks at 8x8, where they are cheapest; "sr64" (32 -> 64) is narrower, with
# attention only at its lowest resolution (16x16).
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(image_size=16, dim=16, dim_mults=(1, 2), num_res_blocks=(1, 1), attn_levels=(False, True), num_heads=2, text_dim=32),
    "base16": dict(image_size=16, dim=48, dim_mults=(1, 2, 2), num_res_blocks=(1, 2, 2), attn_levels=(False, True, True), num_heads=4),
    "base32": dict(image_size=32, dim=48, dim_mults=(1, 2, 2), num_res_blocks=(1, 2, 3), attn_levels=(False, True, True), num_heads=4),
    "sr32": dict(image_size=32, dim=32, dim_mults=(1, 2, 2), num_res_blocks=(1, 1, 2), attn_levels=(False, False, True), num_heads=4, lowres_cond=True),
    "sr64": dict(image_size=64, dim=32, dim_mults=(1, 2, 4, 4), num_res_blocks=(1, 2, 2, 2), attn_levels=(False, False, False, True), num_heads=4, lowres_cond=True),
}


def unet_preset(name: str, **overrides) -> UNetConfig:
    """The UNetConfig of a named preset in UNET_PRESETS, with optional field overrides."""
    if name not in UNET_PRESETS:
        raise ConfigError(f"unknown U-Net preset {name!r}; choose from {sorted(UNET_PRESETS)}")
    return UNetConfig(**{**UNET_PRESETS[name], **overrides})


# Guidance scales (a few units) are spread over the timestep range before the sinusoidal embedding, as the
# low-res noise levels are, so its frequencies resolve them: scale 10 lands where timestep 1000 does.
GUIDANCE_EMBED_SCALE = 100.0


# --- helpers -------------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), as in Transformer positions (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))  # odd dim: one zero column


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, S, D) states over the real tokens of a (B, S) bool mask; zeros for an all-padding row."""
    mask = mask.to(states.dtype)[:, :, None]  # (B, S, 1)
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


# --- leaf layers ---------------------------------------------------------------------------------------------


class Downsample(nn.Module):
    """Halve the resolution without discarding pixels: space-to-depth (2x2 -> channels), then a 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(4 * in_channels, out_channels, kernel_size=1)

    def forward(self, x):
        return self.proj(F.pixel_unshuffle(x, 2))  # (B, 4C, H/2, W/2) -> (B, out, H/2, W/2)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour then a 3x3 conv (avoids transposed-conv checkerboards)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, FiLM by the conditioning vector, GroupNorm-SiLU-dropout-conv; scaled residual sum."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # Zero-init the last conv: the block starts as (a scaled) identity, which keeps deep U-Nets stable early on.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, cond):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(cond))[:, :, None, None].chunk(2, dim=1)  # each (B, out, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return (h + self.skip(x)) * SKIP_SCALE


class AttentionBlock(nn.Module):
    """Pre-norm self-attention over the pixels (unless self_attention=False), then cross-attention from the
    pixels to the text tokens."""

    def __init__(self, dim: int, num_heads: int, context_dim: int, dropout: float = 0.0, self_attention: bool = True):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim) if self_attention else None
        self.self_attn = Attention(dim, num_heads, dropout) if self_attention else None
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads, dropout, context_dim=context_dim)

    def forward(self, x, context=None, context_mask=None):
        B, C, H, W = x.shape
        h = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.self_attn is not None:
            h = h + self.self_attn(self.norm_self(h))
        if context is not None:  # unconditional call: no text to attend to
            h = h + self.cross_attn(self.norm_cross(h), context=context, key_mask=context_mask)
        return h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class AttentionPool(nn.Module):
    """Imagen's attention pooling of the text: learned queries attend over the token states (the null token
    included), and their outputs, concatenated, are projected to the conditioning vector: learned queries can pick
    out what the mean of the token states blurs (on Shapes the mean still tells which colour goes with which shape
    to a linear probe 0.88 of the time, a shape word's own state 0.99; 6,000-step screens measured no gain from
    the pool: bench/RESULTS.md). The projection starts at zero, so the pool joins a trained U-Net's conditioning
    without changing it."""

    def __init__(self, text_dim: int, out_dim: int, num_queries: int, num_heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, num_queries, text_dim) * text_dim**-0.5)
        self.norm = nn.LayerNorm(text_dim)
        self.attn = Attention(text_dim, num_heads)
        self.out = nn.Sequential(nn.LayerNorm(num_queries * text_dim), nn.Linear(num_queries * text_dim, out_dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, context, context_mask):
        """(B, S, text_dim) token states and their (B, S) mask -> (B, out_dim)."""
        queries = self.queries.expand(context.shape[0], -1, -1).to(context.dtype)
        pooled = self.attn(queries, context=self.norm(context), key_mask=context_mask)  # (B, Q, text_dim)
        return self.out(pooled.flatten(1))


# --- levels --------------------------------------------------------------------------------------------------


class DownLevel(nn.Module):
    """One level of the down path: [downsample], res blocks (each output kept as a skip), [attention]."""

    def __init__(self, in_channels: int, channels: int, num_blocks: int, downsample: bool, attention: str | None,
                 num_heads: int, text_dim: int, cond_dim: int, groups: int, dropout: float):
        super().__init__()
        # Registered first so the module order reads as the data flow: downsample BEFORE the convolutions.
        self.downsample = Downsample(in_channels, channels) if downsample else nn.Identity()
        first_in = channels if downsample else in_channels
        self.res_blocks = nn.ModuleList(
            ResBlock(first_in if i == 0 else channels, channels, cond_dim, groups, dropout) for i in range(num_blocks)
        )
        self.attn = AttentionBlock(channels, num_heads, text_dim, dropout, self_attention=attention == "full") if attention else None

    def forward(self, x, cond, context, context_mask):
        x = self.downsample(x)
        skips = []
        for block in self.res_blocks:
            x = block(x, cond)
            skips.append(x)
        if self.attn is not None:
            x = self.attn(x, context, context_mask)
        return x, skips


class UpLevel(nn.Module):
    """One level of the up path: res blocks (each fed one skip), [attention], [upsample] AFTER the convolutions."""

    def __init__(self, channels: int, out_channels: int, num_blocks: int, upsample: bool, attention: str | None,
                 num_heads: int, text_dim: int, cond_dim: int, groups: int, dropout: float):
        super().__init__()
        # Each block sees [x; skip], both `channels` wide.
        self.res_blocks = nn.ModuleList(ResBlock(2 * channels, channels, cond_dim, groups, dropout) for _ in range(num_blocks))
        self.attn = AttentionBlock(channels, num_heads, text_dim, dropout, self_attention=attention == "full") if attention else None
        self.upsample = Upsample(channels, out_channels) if upsample else nn.Identity()

    def forward(self, x, skips, cond, context, context_mask):
        for block in self.res_blocks:
            # Skips scaled by 1/sqrt(2) before concatenation, as in Imagen's Efficient U-Net.
            x = block(torch.cat([x, skips.pop() * SKIP_SCALE], dim=1), cond)  # (B, 2C, H, W) -> (B, C, H, W)
        if self.attn is not None:
            x = self.attn(x, context, context_mask)
        return self.upsample(x)


# --- the model -----------------------------------------------------------------------------------------------


class EfficientUNet(nn.Module):
    """Predicts the noise (or x0 / v: the caller's choice of target) of x_t given t, text and, for SR, a low-res image."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        ch = c.channels
        levels = len(ch)
        # A super-resolution stage sees [x_t; upsampled low-res image] stacked along channels.
        self.init_conv = nn.Conv2d(c.in_channels * (2 if c.lowres_cond else 1), ch[0], kernel_size=3, padding=1)

        self.time_mlp = nn.Sequential(nn.Linear(c.dim, c.time_dim), nn.SiLU(), nn.Linear(c.time_dim, c.time_dim))
        self.text_proj = nn.Sequential(nn.LayerNorm(c.cond_dim), nn.Linear(c.cond_dim, c.time_dim))
        self.lowres_noise_mlp = (
            nn.Sequential(nn.Linear(c.dim, c.time_dim), nn.SiLU(), nn.Linear(c.time_dim, c.time_dim)) if c.lowres_cond else None
        )
        self.text_pool = (AttentionPool(c.text_dim, c.time_dim, c.text_pool_queries, c.num_heads)
                          if c.text_pool_queries else None)
        self.guidance_mlp = None
        if c.guidance_cond:
            self.guidance_mlp = nn.Sequential(nn.Linear(c.dim, c.time_dim), nn.SiLU(), nn.Linear(c.time_dim, c.time_dim))
            # Zero-init the last layer: a student made from a teacher's weights starts as the teacher's conditional
            # branch exactly, at every guidance scale, and learns only the difference guidance makes.
            nn.init.zeros_(self.guidance_mlp[-1].weight)
            nn.init.zeros_(self.guidance_mlp[-1].bias)
        # A learned always-visible text token: a fully padded caption (classifier-free guidance drops the text by
        # masking every token) still leaves a key to attend to instead of an all-masked softmax (NaN).
        self.null_text = nn.Parameter(torch.randn(1, 1, c.text_dim) * 0.02)

        shared = dict(num_heads=c.num_heads, text_dim=c.text_dim, cond_dim=c.time_dim, groups=c.groups, dropout=c.dropout)
        self.downs = nn.ModuleList(
            DownLevel(ch[max(i - 1, 0)], ch[i], c.num_res_blocks[i], downsample=i > 0, attention=c.attention_kind(i), **shared)
            for i in range(levels)
        )
        self.mid_block1 = ResBlock(ch[-1], ch[-1], c.time_dim, c.groups, c.dropout)
        self.mid_attn = AttentionBlock(ch[-1], c.num_heads, c.text_dim, c.dropout)
        self.mid_block2 = ResBlock(ch[-1], ch[-1], c.time_dim, c.groups, c.dropout)
        self.ups = nn.ModuleList(
            UpLevel(ch[i], ch[max(i - 1, 0)], c.num_res_blocks[i], upsample=i > 0, attention=c.attention_kind(i), **shared)
            for i in reversed(range(levels))
        )
        self.out_norm = nn.GroupNorm(c.groups, ch[0])
        # Default (Kaiming-uniform) init, not zero: the output starts small but non-constant, and gradients reach
        # every block from the first step (a zero output conv would block them until it moved).
        self.out_conv = nn.Conv2d(ch[0], c.out_channels, kernel_size=3, padding=1)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "EfficientUNet":
        """Build a U-Net from a named preset in UNET_PRESETS, with optional field overrides."""
        return cls(unet_preset(name, **overrides))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @contextlib.contextmanager
    def recording_cross_attention(self):
        """Within the block, every cross-attention records its head-averaged probabilities: yields a list that
        each forward extends with one (B, H*W, 1 + S) tensor per cross-attention (key 0 is the null text token),
        in call order; the resolution of each is its H*W."""
        blocks = [m.cross_attn for m in self.modules() if isinstance(m, AttentionBlock)]
        maps: list[torch.Tensor] = []
        for attn in blocks:
            attn.recorded = maps
        try:
            yield maps
        finally:
            for attn in blocks:
                attn.recorded = None

    def conditioning(self, t, text_states, text_mask, text_embed, lowres_noise_level, guidance=None,
                     context=None, context_mask=None) -> torch.Tensor:
        """One (B, time_dim) vector: time embedding + pooled text + [attention-pooled tokens (`context`, the null
        token first)] + [low-res noise level] + [guidance scale], summed."""
        c = self.config
        cond = self.time_mlp(timestep_embedding(t, c.dim))
        if text_embed is None and text_states is not None:
            if c.cond_dim != c.text_dim:
                raise ValueError(f"cond_dim {c.cond_dim} differs from text_dim {c.text_dim}: pass text_embed explicitly")
            text_embed = masked_mean(text_states, text_mask)
        if text_embed is not None:
            cond = cond + self.text_proj(text_embed)
        if self.text_pool is not None and context is not None:
            cond = cond + self.text_pool(context, context_mask)
        if self.lowres_noise_mlp is not None:
            # Levels in [0, 1] are spread over the timestep range so the sinusoid frequencies suit them.
            cond = cond + self.lowres_noise_mlp(timestep_embedding(lowres_noise_level * 1000, c.dim))
        if self.guidance_mlp is not None:
            cond = cond + self.guidance_mlp(timestep_embedding(guidance * GUIDANCE_EMBED_SCALE, c.dim))
        return cond

    def forward(self, x_t, t, *, text_states=None, text_mask=None, text_embed=None, lowres_image=None, lowres_noise_level=None,
                guidance=None):
        """(B, in_channels, H, W) noisy images at timesteps t (B,) -> (B, out_channels, H, W) prediction.

        A guidance-conditioned U-Net also takes `guidance` (B,) (or a scalar): the classifier-free guidance scale whose
        guided prediction it makes.
        """
        c = self.config
        B, _, H, W = x_t.shape
        factor = 2 ** (len(c.dim_mults) - 1)
        if H % factor or W % factor:
            raise ValueError(f"image size {H}x{W} is not a multiple of {factor}")
        if c.lowres_cond:
            if lowres_image is None or lowres_noise_level is None:
                raise ValueError("a super-resolution U-Net needs lowres_image and lowres_noise_level")
            x_t = torch.cat([x_t, lowres_image], dim=1)  # (B, 2 * in_channels, H, W)
        elif lowres_image is not None:
            raise ValueError("lowres_image given but the U-Net was built with lowres_cond=False")
        t = t.expand(B) if t.dim() == 0 else t
        if c.guidance_cond:
            if guidance is None:
                raise ValueError("a guidance-distilled U-Net needs the guidance scale (guidance=...)")
            guidance = torch.as_tensor(guidance, dtype=torch.float32, device=x_t.device)
            guidance = guidance.expand(B) if guidance.dim() == 0 else guidance
        elif guidance is not None:
            raise ValueError("guidance given but the U-Net was built with guidance_cond=False; guide it with "
                             "classifier-free guidance instead")

        context = context_mask = None
        if text_states is not None:
            if text_mask is None:
                text_mask = torch.ones(text_states.shape[:2], dtype=torch.bool, device=text_states.device)
            text_mask = text_mask.bool()
            context = torch.cat([self.null_text.expand(B, -1, -1).to(text_states.dtype), text_states], dim=1)  # (B, 1+S, text_dim)
            context_mask = F.pad(text_mask, (1, 0), value=True)  # (B, 1+S), the null token always visible
        cond = self.conditioning(t, text_states, text_mask, text_embed, lowres_noise_level, guidance, context, context_mask)

        x = self.init_conv(x_t)
        skips = []
        for level in self.downs:
            x, level_skips = level(x, cond, context, context_mask)
            skips.extend(level_skips)
        x = self.mid_block1(x, cond)
        x = self.mid_attn(x, context, context_mask)
        x = self.mid_block2(x, cond)
        for level in self.ups:
            x = level(x, skips, cond, context, context_mask)
        return self.out_conv(F.silu(self.out_norm(x)))
