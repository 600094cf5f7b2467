"""Image tensors to pictures and PNG files: uint8 conversion, resizing, single images and grids, written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from imagen.atomic import atomic_path
from imagen.data.images import normalize_images


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float images (B, C, H, W): antialiased bilinear down, bicubic up (the SR input)."""
    if x.shape[-1] == size:
        return x
    if size < x.shape[-1]:
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, C, H, W) -> uint8 on the CPU."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, C, H, W) pictures at size x size (e.g. the Shapes evaluator's 32x32), uint8 again."""
    if images.shape[-1] == size:
        return images
    return to_uint8(resize_images(normalize_images(images), size))


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Write one (C, H, W) image in [-1, 1] (or uint8) as PNG, atomically."""
    arr = (image if image.dtype == torch.uint8 else to_uint8(image[None])[0]).permute(1, 2, 0).numpy()  # (H, W, C)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return Path(path)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, pad: int = 2) -> Path:
    """Tile (B, C, H, W) images (in [-1, 1] or uint8) into one PNG, `nrow` per row."""
    imgs = images if images.dtype == torch.uint8 else to_uint8(images)
    B, C, H, W = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    rows = math.ceil(B / nrow)
    grid = torch.zeros(C, rows * (H + pad) + pad, nrow * (W + pad) + pad, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = imgs[i]
    return save_image(grid, path)
