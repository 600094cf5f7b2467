"""The Emoji set: colour pictures rendered from Noto Color Emoji, captioned with their Unicode names."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from imagen.atomic import atomic_path
from imagen.errors import DataError

FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_SIZE = 109  # the bitmap strike the font ships; other sizes fail to load
BACKGROUND = (16, 16, 16)
_CANVAS = 160  # larger than the 136 x 128 glyph bitmap so nothing is clipped
# Categories of real pictographs; digits, keycap bases, skin-tone modifiers, tags and controls are not pictures.
_CATEGORIES = {"So", "Sm", "Po", "Pd"}
_CACHE_VERSION = 1


def font_path() -> Path:
    """Path of the emoji font; DataError naming the Debian package when it is missing."""
    path = Path(os.environ.get("IMAGEN_EMOJI_FONT", FONT_PATH))
    if not path.is_file():
        raise DataError(f"emoji font not found at {path}; install the Debian package fonts-noto-color-emoji "
                        "(sudo apt-get install fonts-noto-color-emoji)")
    return path


def cache_dir() -> Path:
    """Where rendered datasets are cached: $IMAGEN_CACHE_DIR or ~/.cache/imagen."""
    return Path(os.environ.get("IMAGEN_CACHE_DIR") or Path.home() / ".cache" / "imagen")


def _candidate_codepoints(path: Path) -> list[int]:
    """Single codepoints the font maps, from its cmap (fontTools) or by probing the usual emoji blocks."""
    try:
        from fontTools.ttLib import TTFont

        cps = sorted(TTFont(str(path), lazy=True).getBestCmap())
    except ImportError:
        cps = [c for lo, hi in ((0x2600, 0x27BF), (0x1F300, 0x1FAFF)) for c in range(lo, hi + 1)]
    out = []
    for c in cps:
        ch = chr(c)
        if unicodedata.category(ch) not in _CATEGORIES or not unicodedata.name(ch, ""):
            continue
        if c < 0x80 or 0x1F1E6 <= c <= 0x1F1FF:  # ASCII '#', '*' (keycap bases) and flag halves are not pictures
            continue
        out.append(c)
    return out


def render_glyph(ch: str, font: ImageFont.FreeTypeFont, size: int) -> np.ndarray | None:
    """Render one emoji centred on the dark background at size x size; None if it draws nothing."""
    canvas = Image.new("RGBA", (_CANVAS, _CANVAS), (0, 0, 0, 0))
    try:
        ImageDraw.Draw(canvas).text((8, 8), ch, font=font, embedded_color=True)
    except (OSError, RuntimeError, ValueError):  # raqm/FreeType refuse some codepoints
        return None
    bbox = canvas.getbbox()
    if bbox is None:
        return None
    glyph = canvas.crop(bbox)
    # Pad to a square so resizing keeps the aspect ratio; ~6 % margin keeps edges off the border.
    side = int(max(glyph.size) * 1.12)
    square = Image.new("RGBA", (side, side), BACKGROUND + (255,))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    img = square.convert("RGB").resize((size, size), Image.LANCZOS, reducing_gap=None)
    return np.asarray(img, dtype=np.uint8)


def render_all(size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Render every usable single-codepoint emoji: images (N,size,size,3), codepoints (N,), names."""
    path = font_path()
    try:
        font = ImageFont.truetype(str(path), FONT_SIZE)
    except OSError as exc:
        raise DataError(f"cannot load emoji font {path} ({exc}); reinstall fonts-noto-color-emoji") from None
    images, cps, names = [], [], []
    for c in _candidate_codepoints(path):
        arr = render_glyph(chr(c), font, size)
        if arr is not None:
            images.append(arr)
            cps.append(c)
            names.append(unicodedata.name(chr(c)).lower())
    if not images:
        raise DataError(f"emoji font {path} rendered no glyphs; reinstall fonts-noto-color-emoji")
    return np.stack(images), np.asarray(cps, dtype=np.int64), names


def load_emoji(size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Rendered emoji at `size`, from the .npz cache when it matches the installed font, else rendered and cached."""
    path = font_path()
    stat = path.stat()
    stamp = np.asarray([_CACHE_VERSION, size, stat.st_size, int(stat.st_mtime)], dtype=np.int64)
    cache = cache_dir() / f"emoji-{size}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if np.array_equal(z["stamp"], stamp):
                    return z["images"], z["codepoints"], [str(s) for s in z["names"]]
        except Exception:  # a corrupt or old cache is simply rebuilt
            pass
    images, cps, names = render_all(size)
    try:
        # Atomic, so concurrent processes never read a half-written cache; a file object stops savez adding ".npz".
        with atomic_path(cache) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images, codepoints=cps, names=np.asarray(names), stamp=stamp)
    except OSError:
        pass  # caching is an optimisation; a read-only home must not break loading
    return images, cps, names
