"""Optimiser with decoupled weight-decay groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

# Parameters whose name contains one of these never get weight decay: decaying position / token embeddings
# pulls rarely seen rows to zero, and decaying norm gains fights the normalisation they undo.
NO_DECAY_NAME_PARTS = ("pos_embed", "embed", "norm")


def decays(name: str, param: torch.Tensor) -> bool:
    """The weight-decay rule: matrices and kernels (ndim >= 2) decay, except embeddings and norms by name.

    Biases, norm gains and other vectors (ndim < 2) never decay.
    """
    return param.ndim >= 2 and not any(part in name for part in NO_DECAY_NAME_PARTS)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed and a non-decayed group (empty groups left out)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def fused_adamw_supported(model: nn.Module) -> bool:
    """Whether every trainable parameter is a floating tensor on a CPU or CUDA device (where fused AdamW exists)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov momentum) over the model's trainable parameters, with weight-decay groups."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # The fused kernel (one pass over all parameters) where torch has it for the parameters' device and dtype;
        # on CPU torch's default is the per-tensor loop.
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused_adamw_supported(model) or None)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose adamw or sgd")


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
