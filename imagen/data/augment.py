"""Batched image augmentation on uint8 tensors, drawn from torch's global RNG (so resumed runs replay it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "shift", "shift-flip")


def random_shift(images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (reflect-padded random crop, as in CIFAR recipes)."""
    if max_shift <= 0:
        return images
    B, C, H, W = images.shape
    padded = F.pad(images.float(), (max_shift,) * 4, mode="replicate").to(images.dtype)
    dx = torch.randint(0, 2 * max_shift + 1, (B,))
    dy = torch.randint(0, 2 * max_shift + 1, (B,))
    rows = (dy[:, None] + torch.arange(H)[None]).to(images.device)  # (B, H)
    cols = (dx[:, None] + torch.arange(W)[None]).to(images.device)  # (B, W)
    batch = torch.arange(B, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_hflip(images: torch.Tensor) -> torch.Tensor:
    """Mirror a random half of the batch left-right."""
    flip = (torch.rand(images.shape[0]) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def augment(images: torch.Tensor, kind: str) -> torch.Tensor:
    """Apply a named augmentation: none, shift (up to 1/8 of the side) or shift-flip."""
    if kind == "none":
        return images
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; choose one of: {', '.join(AUGMENTATIONS)}")
    images = random_shift(images, max(1, images.shape[-1] // 8))
    return random_hflip(images) if kind == "shift-flip" else images
