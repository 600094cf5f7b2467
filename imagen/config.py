"""Typed configs for every component, the named presets, and dotted-key overrides.

Every config is a dataclass that round-trips through JSON, so a run directory's ``config.json`` rebuilds
exactly the model and training setup that produced it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from imagen.errors import ConfigError

# Text-to-image sampling: the classifier-free guidance scale when none is given. On Shapes, guidance 3 gave the
# best compositional accuracy of 1, 3, 5 and 8 in every category (bench/RESULTS.md, the guidance sweep); only
# guidance 1 had a lower FID. Large Imagen models use more.
DEFAULT_GUIDANCE = 3.0

# Text-to-image training: optimiser steps per stage of the default recipe (batch 32), about 24 + 3.5 minutes on 2
# CPU cores for Shapes. Relations need base steps (5000 -> 8000 -> 11000 -> 14000: relation accuracy 0.30 -> 0.44
# -> 0.55 -> 0.60 / 0.56 (two seeds) on 100 prompts; batch 64 for as long did worse); SR is easy (2000 steps draw
# as well as 3000).
DEFAULT_T2I_STEPS = {"base": 14000, "sr": 1500}

# Text-to-image training: which captions of an image a visit may draw. "all": one of its captions at random
# (several rows about one image; Shapes paraphrases); "first": only its first caption.
CAPTION_MODES = ("all", "first")
DEFAULT_T2I_CAPTIONS = "first"

# torch.compile modes a training run may ask for (`--compile`); "off" trains the eager modules.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")

# Guidance distillation (`imagen distill`): which stages, the guidance scales the student learns (drawn uniformly:
# 1 = no guidance, up to twice the default), and its optimiser steps (batch 32) and peak learning rate; the student
# starts as the teacher, so it fine-tunes more gently than a stage trains.
DEFAULT_DISTILL_STAGES = ("base",)
DEFAULT_DISTILL_GUIDANCE_RANGE = (1.0, 2 * DEFAULT_GUIDANCE)
DEFAULT_DISTILL_STEPS = 2000
DEFAULT_DISTILL_LR = 1e-4
# Progressive distillation (`imagen distill --steps N`): the teacher's DDIM step count of the first halving (when the
# teacher stage is not progressively distilled already), and each halving's optimiser steps (batch 32).
DEFAULT_PROGRESSIVE_START_STEPS = 64
DEFAULT_PROGRESSIVE_PHASE_STEPS = 1000
PROGRESSIVE_SAMPLER = "ddim"  # the sampler a progressively distilled stage was distilled for, and samples with

# Text-to-image sampling: the names the diffusion registries are keyed by, and the defaults of
# `imagen.diffusion.SamplingConfig`. They live here, torch-free, so the CLI's help reads them without importing torch.
SAMPLER_NAMES = ("dpmpp2m", "ddim", "ddpm", "dpmpp3m", "unipc")  # imagen.diffusion.SAMPLERS, in this order
THRESHOLD_NAMES = ("dynamic", "static", "none")  # imagen.diffusion.THRESHOLDS
OBJECTIVE_NAMES = ("eps", "v", "x0")  # imagen.diffusion.OBJECTIVES
SCHEDULE_NAMES = ("linear", "cosine")  # imagen.diffusion.BETA_SCHEDULES, in this order
DEFAULT_SAMPLER = "dpmpp2m"
DEFAULT_SAMPLING_STEPS = 25
DEFAULT_THRESHOLD = "dynamic"
DEFAULT_PERCENTILE = 0.995  # dynamic thresholding's percentile of |pred_x0| (Imagen sec. 2.3)
DEFAULT_AUG_LEVEL = 0.1  # noise-augmentation level of the low-res image at each super-resolution stage
DEFAULT_STRENGTH = 0.6  # image-to-image: share of the steps to run from the noised init image
# Samples denoised together (one chunk through the whole cascade); memory grows with it, never with --n.
DEFAULT_SAMPLING_BATCH_SIZE = 16
MAX_SAMPLES_PER_PROMPT = 10_000
# `imagen serve`: rows (samples or images) run together, how long a batch waits to fill, waiting requests before
# 429, and seconds from arrival to answer before 504.
DEFAULT_SERVE_MAX_BATCH = 8
DEFAULT_SERVE_MAX_WAIT_MS = 20.0
DEFAULT_SERVE_QUEUE = 64
DEFAULT_SERVE_TIMEOUT_S = 60.0

# `imagen refresh`: the share of each refresh's training examples drawn back from the data the current version was
# trained on (so old classes are not forgotten), and how much worse than the current version a candidate may score
# on the holdout and still be promoted.
DEFAULT_REFRESH_REPLAY = 0.3
DEFAULT_REFRESH_TOLERANCE = 0.005



def check_range(name: str, value: Any, lo: float, hi: float, integer: bool = True) -> None:
    """ConfigError naming `name` unless `value` is an integer (or, with integer=False, a number) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ConfigError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not lo <= value <= hi:  # NaN fails here too
        raise ConfigError(f"{name} must be in [{lo:g}, {hi:g}], got {value}")


# Sane upper bounds of model sizes: far above any preset, far below what would exhaust a machine's memory by a typo.
MAX_IMAGE_SIZE = 1024
MAX_DIM = 8192
MAX_LAYERS = 256
MAX_HEADS = 256
STEM_NORMS = ("none", "batch")
MAX_TOKENS = 16384  # image patches + text tokens one attention sees


@dataclass
class EncoderConfig:
    """The multimodal Transformer: ViT patches + text tokens through one joint encoder."""

    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    stem_channels: int = 32  # channels of the first 3x3 conv before the patch projection; 0 = plain ViT patches
    stem_layers: int = 1  # 3x3 convs in the stem; after the first, each halves the resolution (see PatchEmbed)
    stem_norm: str = "none"  # "batch": BatchNorm after each stem conv (the convolutional stem of Xiao et al. 2021)
    qk_norm: bool = False  # LayerNorm of attention queries and keys (see models/layers.Attention)
    vocab_size: int = 1024
    max_text_len: int = 32
    dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    pad_token_id: int = 0

    def __post_init__(self):
        bounds = dict(image_size=MAX_IMAGE_SIZE, patch_size=self.image_size, in_channels=16, vocab_size=10**6,
                      max_text_len=MAX_TOKENS, dim=MAX_DIM, num_layers=MAX_LAYERS, num_heads=MAX_HEADS)
        for name, hi in bounds.items():
            check_range(f"model.{name}", getattr(self, name), 1, hi)
        check_range("model.stem_channels", self.stem_channels, 0, MAX_DIM)
        check_range("model.stem_layers", self.stem_layers, 0, 8)
        if self.stem_norm not in STEM_NORMS:
            raise ConfigError(f"model.stem_norm must be one of {', '.join(STEM_NORMS)}, got {self.stem_norm!r}")
        check_range("model.pad_token_id", self.pad_token_id, 0, self.vocab_size - 1)
        check_range("model.mlp_ratio", self.mlp_ratio, 0.001, 64, integer=False)
        check_range("model.dropout", self.dropout, 0, 1, integer=False)
        if self.image_size % self.patch_size:
            raise ConfigError(f"image size {self.image_size} is not a multiple of patch size {self.patch_size}")
        if self.dim % self.num_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.num_patches + self.max_text_len > MAX_TOKENS:
            raise ConfigError(f"{self.num_patches} patches + {self.max_text_len} text tokens exceed {MAX_TOKENS} tokens; "
                              "use a larger model.patch_size or a smaller model.image_size")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# Named presets: one table. Sizes follow ViT's naming (Ti/S/B) scaled down for CPU work.
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, num_layers=2, num_heads=2, mlp_ratio=2.0),
    "mini": dict(dim=128, num_layers=4, num_heads=4, mlp_ratio=2.0),  # the classify recipe's, on real images
    "small": dict(dim=192, num_layers=6, num_heads=3, mlp_ratio=4.0),
    "base": dict(dim=384, num_layers=8, num_heads=6, mlp_ratio=4.0),
}


@dataclass
class PretrainConfig:
    """Weights and masking rates of the self-supervised objectives (0 disables an objective)."""

    mlm_weight: float = 1.0
    mim_weight: float = 1.0
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_probability: float = 0.15
    mim_mask_ratio: float = 0.5
    # Blank the masked patches in the pixels too, so a convolutional stem (whose receptive field reaches past its
    # patch) cannot see them. Off by default: on the demo it lowered the fine-tuned accuracy (bench/RESULTS.md).
    mim_blank_pixels: bool = False
    # MAE's asymmetric design (He et al. 2022): with decoder layers > 0 the encoder sees only the visible patches and
    # a light Transformer decoder (its own width, mim_decoder_dim; 0 = the encoder's) fills in the mask tokens and
    # predicts the pixels. 0 layers: SimMIM's design, mask tokens in the encoder and a linear pixel head.
    mim_decoder_layers: int = 0
    mim_decoder_dim: int = 0
    # Image-only pretraining (e.g. unlabelled images whose captions would leak labels).
    image_only: bool = False

    def __post_init__(self):
        for name in ("mlm_weight", "mim_weight", "itc_weight", "itm_weight"):
            check_range(f"pretrain.{name}", getattr(self, name), 0, 1e6, integer=False)
        check_range("pretrain.mlm_probability", self.mlm_probability, 0, 1.0, integer=False)
        if not 0.0 < self.mim_mask_ratio < 1.0:
            raise ConfigError(f"pretrain.mim_mask_ratio must be between 0 and 1 (exclusive), got {self.mim_mask_ratio}")
        check_range("pretrain.mim_decoder_layers", self.mim_decoder_layers, 0, 64)
        check_range("pretrain.mim_decoder_dim", self.mim_decoder_dim, 0, 8192)
        if self.mim_decoder_dim % 32:
            raise ConfigError(f"pretrain.mim_decoder_dim {self.mim_decoder_dim} is not a multiple of 32 (the decoder's "
                              "head width); choose e.g. 64, 128 or 256, or 0 for the encoder's width")


@dataclass
class TrainConfig:
    """Everything the task-agnostic trainer needs."""

    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 64
    epochs: int = 1
    max_steps: int | None = None  # optimiser steps; overrides epochs when set
    warmup_steps: int = 0
    warmup_ratio: float = 0.05  # used when warmup_steps == 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 disables
    # Layer-wise learning-rate decay (BEiT, Bao et al. 2022; MAE fine-tuning): encoder block i of L trains at
    # lr * layer_decay ** (L - i), the embeddings at lr * layer_decay ** (L + 1), heads and the final norm at lr.
    # 1.0 disables; for fine-tuning a pretrained encoder 0.65-0.75 is usual.
    layer_decay: float = 1.0
    grad_accum: int = 1
    eval_every: int | None = None  # optimiser steps; None -> once per epoch
    early_stopping_patience: int | None = None  # evaluations without improvement
    checkpoint_every: int | None = None  # optimiser steps
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda | mps
    # torch.compile of the task's networks (off | default | reduce-overhead | max-autotune); reduce-overhead also
    # replays CUDA graphs, for small models whose steps are bound by kernel launches on a GPU.
    compile: str = "off"
    num_workers: int = 0
    report_to: tuple[str, ...] = ("jsonl", "tensorboard")  # plus "wandb" (offline)
    progress: bool = True

    def __post_init__(self):
        for name, hi in dict(batch_size=65536, epochs=10**6, grad_accum=4096, warmup_steps=10**9, keep_checkpoints=10**6,
                             log_every=10**9, num_workers=256, seed=2**63 - 1).items():
            check_range(f"train.{name}", getattr(self, name), 1 if name in ("batch_size", "epochs", "grad_accum") else 0, hi)
        for name in ("max_steps", "eval_every", "early_stopping_patience", "checkpoint_every"):
            if getattr(self, name) is not None:
                check_range(f"train.{name}", getattr(self, name), 1, 10**9)
        for name, hi in dict(lr=10.0, weight_decay=10.0, momentum=1.0, warmup_ratio=1.0, min_lr_ratio=1.0, grad_clip=1e6,
                             layer_decay=1.0).items():
            check_range(f"train.{name}", getattr(self, name), 0, hi, integer=False)
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose adamw or sgd")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(self.device)):
            raise ConfigError(f"unknown device {self.device!r}; use auto, cpu, cuda, cuda:N or mps")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"unknown precision {self.precision!r}; choose auto, fp32 or bf16")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"unknown compile mode {self.compile!r}; choose {', '.join(COMPILE_MODES)}")
        if self.lr == 0:
            raise ConfigError("learning rate must be positive, got 0")
        if self.layer_decay == 0:
            raise ConfigError("train.layer_decay must be in (0, 1] (1 disables it), got 0")
        self.betas = tuple(self.betas)
        self.report_to = tuple(self.report_to)


# ----------------------------------------------------------------------------------------------
# JSON round trip and dotted-key overrides


def to_dict(cfg) -> dict[str, Any]:
    """A JSON-serialisable dict of a (nested) dataclass config."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls, data: dict[str, Any]):
    """Build a dataclass config from a dict, rejecting unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    return cls(**data)


def _json_or_str(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _coerce(value: str, current: Any, key: str, field_type: Any = None) -> Any:
    """Parse a command-line string into the type of the field's current value (or, when that is None, of the
    field's declared type: an optional tuple takes comma-separated items)."""
    try:
        if isinstance(current, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):
            return tuple(_coerce(v, current[0], key) if current else v for v in value.split(","))
        if current is None:
            if value.lower() in ("none", "null"):
                return None
            if "tuple" in str(field_type):  # e.g. --set base.unet.cross_attn_levels=true,false,false
                return tuple(_json_or_str(v) for v in value.split(","))
            return _json_or_str(value)
    except ValueError:
        raise ConfigError(f"bad value {value!r} for {key} (expected {type(current).__name__})") from None
    return value


def apply_overrides(configs: dict[str, Any], overrides: list[str]) -> None:
    """Apply ``section.key=value`` (or ``section.sub.key=value``) overrides in place; unknown keys are errors."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, value = item.split("=", 1)
        parts = dotted.split(".")
        if parts[0] not in configs or len(parts) < 2:
            raise ConfigError(f"unknown config key {dotted!r}; sections are: {', '.join(sorted(configs))}")
        chain = [configs[parts[0]]]
        for depth, key in enumerate(parts[1:], start=1):
            cfg = chain[-1]
            names = {f.name for f in dataclasses.fields(cfg)} if dataclasses.is_dataclass(cfg) else set()
            if key not in names:
                where = ".".join(parts[:depth])
                raise ConfigError(f"unknown config key {dotted!r}; valid keys in {where}: {', '.join(sorted(names)) or '(none)'}")
            if depth < len(parts) - 1:
                chain.append(getattr(cfg, key))
        cfg, key = chain[-1], parts[-1]
        field_type = next(f.type for f in dataclasses.fields(cfg) if f.name == key)
        if "None" in str(field_type) and value.lower() in ("none", "null"):
            setattr(cfg, key, None)  # e.g. --set base.min_snr_gamma=none
        else:
            setattr(cfg, key, _coerce(value, getattr(cfg, key), dotted, field_type))
        for c in reversed(chain):  # re-validate from the innermost config out
            if hasattr(c, "__post_init__"):
                c.__post_init__()


def default_of(cls, name: str) -> Any:
    """The default of one field of a dataclass config (what help texts show: each default written once)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def encoder_config(preset: str = "tiny", **overrides) -> EncoderConfig:
    """An EncoderConfig from a named preset plus explicit overrides."""
    if preset not in ENCODER_PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(ENCODER_PRESETS)}")
    values = dict(ENCODER_PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return EncoderConfig(**values)
