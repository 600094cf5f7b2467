"""Optimiser with decoupled weight-decay groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from imagen.config import ConfigError

# Parameters whose name contains one of these never get weight decay: decaying position / token embeddings
# pulls rarely seen rows to zero, and decaying norm gains fights the normalisation they undo.
NO_DECAY_NAME_PARTS = ("pos_embed", "embed", "norm")


def decays(name: str, param: torch.Tensor) -> bool:
    """The weight-decay rule: matrices and kernels (ndim >= 2) decay, except embeddings and norms by name.

    Biases, norm gains and other vectors (ndim < 2) never decay.
    """
    return param.ndim >= 2 and not any(part in name for part in NO_DECAY_NAME_PARTS)


ENCODER_BLOCK = re.compile(r"(?:^|\.)encoder\.blocks\.(\d+)\.")
ENCODER_EMBEDDING = re.compile(r"(?:^|\.)encoder\.(?!blocks\.|norm\.)")


def layer_depths(model: nn.Module) -> tuple[dict[str, int], int]:
    """Each parameter's depth for layer-wise lr decay, and the number of encoder blocks L: the encoder's embeddings
    (patch stem, [CLS], position, token and modality embeddings) 0, encoder block i i + 1, everything above (the
    final norm, heads, decoders) L + 1. A model without encoder blocks has L = 0."""
    block_of = {name: int(m.group(1)) if (m := ENCODER_BLOCK.search(name)) else None for name, _ in model.named_parameters()}
    num_blocks = len({b for b in block_of.values() if b is not None})
    depths = {}
    for name, block in block_of.items():
        if block is not None:
            depths[name] = block + 1
        else:
            depths[name] = 0 if ENCODER_EMBEDDING.search(name) else num_blocks + 1
    return depths, num_blocks


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Trainable parameters split into a decayed and a non-decayed group (empty groups left out); with
    `layer_decay` < 1 each group is split further by depth, with an "lr_scale" of layer_decay ** (L + 1 - depth)
    (`layer_depths`), which `build_optimizer` applies to the learning rate."""
    depths, num_blocks = ({}, 0)
    if layer_decay < 1.0:
        depths, num_blocks = layer_depths(model)
        if num_blocks == 0:
            raise ConfigError("train.layer_decay needs a model with encoder blocks (encoder.blocks.N); this model has "
                              "none: leave train.layer_decay at 1")
    groups: dict[tuple[bool, int], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((decays(name, param), depths.get(name, 0)), []).append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    out = []
    for (decayed, depth), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        group = {"params": params, "weight_decay": weight_decay if decayed else 0.0}
        if layer_decay < 1.0:
            group["lr_scale"] = layer_decay ** (num_blocks + 1 - depth)
        out.append(group)
    return out


def fused_adamw_supported(model: nn.Module) -> bool:
    """Whether every trainable parameter is a floating tensor on a CPU or CUDA device (where fused AdamW exists)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov momentum) over the model's trainable parameters, with weight-decay groups."""
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    for group in groups:
        group["lr"] = cfg.lr * group.pop("lr_scale", 1.0)
    if cfg.optimizer == "adamw":
        # The fused kernel (one pass over all parameters) where torch has it for the parameters' device and dtype;
        # on CPU torch's default is the per-tensor loop.
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused_adamw_supported(model) or None)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose adamw or sgd")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """`optimizer.load_state_dict`, then every per-parameter state tensor laid out in memory as its parameter.

    A checkpoint keeps its moments in the layout its weights had (channels-last or not: `channels_last_pays` in
    imagen.train.device decides per machine). Fused AdamW reads the moments in the parameter's layout without
    checking, so a channels-last parameter with contiguous moments would be updated from the wrong elements.
    """
    optimizer.load_state_dict(state_dict)
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)  # p's strides, value's numbers


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier for optimiser step `step` (0-based): linear warmup to 1, then cosine down to `min_ratio`.

    Warmup is (step + 1) / warmup so the first step already learns; the cosine of SGDR
    (Loshchilov & Hutter, 2017, https://arxiv.org/abs/1608.03983) reaches `min_ratio` at step == total.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(total_steps: int, cfg) -> int:
    """cfg.warmup_steps when set, else round(cfg.warmup_ratio * total_steps)."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else round(cfg.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup + cosine schedule over `total_steps` optimiser steps; call `.step()` after every optimiser step."""
    warmup = warmup_steps(total_steps, cfg)
    min_ratio = cfg.min_lr_ratio
    # A plain closure (not a partial or object) so LambdaLR.state_dict() stays free of pickled code.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_lambda(step, warmup, total_steps, min_ratio))
