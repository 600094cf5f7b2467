"""Image decoding, mode conversion to RGB, conversion to uint8 tensors and their normalisation for models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from imagen.errors import DataError

# Decoding must fail loudly on truncated files rather than silently pad them with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


def is_image_path(path: str | os.PathLike) -> bool:
    """True if the file name has an image extension."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map a high-bit-depth array to 0..255: 16-bit by the 16-bit range, 'I'/'F' by the range their values use."""
    arr = arr.astype(np.float64)
    lo_v, hi_v = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        lo, hi = 0.0, 65535.0
    elif mode == "F" and lo_v >= 0.0 and hi_v <= 1.0:
        lo, hi = 0.0, 1.0  # floats already normalised
    elif lo_v >= 0.0 and hi_v <= 255.0:
        lo, hi = 0.0, 255.0  # 8-bit values stored in a wide type
    elif lo_v >= 0.0 and hi_v <= 65535.0:
        lo, hi = 0.0, 65535.0  # 16-bit PNGs often open as mode 'I'
    else:
        lo, hi = lo_v, hi_v  # unknown range: stretch what is there
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((arr - lo) * scale + 0.5, 0, 255).astype(np.uint8)


def _composite_on_black(img: Image.Image) -> Image.Image:
    """Drop alpha by compositing onto black, so transparent pixels do not keep arbitrary hidden colours."""
    rgba = img.convert("RGBA")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB, compositing alpha onto black."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = _scale_to_uint8(np.asarray(img), mode)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P":
        # Palette images may carry transparency in info; RGBA conversion honours it.
        if "transparency" in img.info:
            return _composite_on_black(img.convert("RGBA"))
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        return _composite_on_black(img)
    if mode == "CMYK":
        return img.convert("RGB")
    if mode == "1":
        return img.convert("L").convert("RGB")
    return img.convert("RGB")  # L, YCbCr, LAB, HSV and anything else Pillow knows


# Largest image decoded: a 48-megapixel photo fits; a decompression bomb under Pillow's own limit does not.
MAX_IMAGE_PIXELS = 64 * 10**6


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file as RGB; DataError if missing, empty, truncated or not an image."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder, not an image file; give the image files in it, e.g. {path / '*.png'}")
    if not path.is_file():
        raise DataError(f"image file not found: {path}; check the path (relative paths are resolved against the annotation file)")
    if path.stat().st_size == 0:
        raise DataError(f"image file is empty: {path}; remove it or replace it with a valid image")
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:  # checked before decoding: a 13000 x 13000 PNG takes 1.8 GB
                raise DataError(f"image {path} is {img.width} x {img.height}, over the limit of {MAX_IMAGE_PIXELS // 10**6} "
                                "million pixels; downscale it or remove it")
            img.load()  # force a full decode now, so truncated data fails here and not mid-training
            return to_rgb(img).copy()
    except DataError:
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot decode image {path} ({reason}); remove the file or replace it with a valid image") from None


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (bicubic, antialiased) and centre-crop to size x size."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> uint8 tensor (3, size, size), resized/centre-cropped when needed."""
    img = resize_square(to_rgb(img), size)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)
