"""The Shapes world's vocabulary and geometry: colours, shapes, sizes, positions, placement, relations, drawing.

The bottom of the Shapes modules: `shapes_text` words scenes in these terms and `shapes` (the dataset) builds
on both, so dependencies run one way. A scene is a list of objects {"shape", "color", "size", "position",
"box": [x0, y0, x1, y1]} (pixels on a size x size canvas).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (230, 200, 40),
    "green": (40, 180, 60),
    "cyan": (40, 190, 200),
    "blue": (40, 80, 220),
    "purple": (150, 60, 200),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
BACKGROUND = (16, 16, 16)
# Row-major 3 x 3 grid of position words, indexed [row][col].
POSITIONS = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))
# Extent ranges (fraction of the canvas side); the gap between them keeps "small" and "large" visibly distinct.
EXTENT = {"small": (0.25, 0.33), "large": (0.37, 0.45)}
SUPERSAMPLE = 4
MAX_OBJECTS = 3


def position_word(box: list[int], size: int) -> str:
    """Position word of the 3 x 3 cell holding the box centre."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    col, row = min(2, int(cx * 3 / size)), min(2, int(cy * 3 / size))
    return POSITIONS[row][col]


def relation(a: dict, b: dict) -> str:
    """Spatial relation of object a to object b from their centres along the dominant axis."""
    ax, ay = (a["box"][0] + a["box"][2]) / 2, (a["box"][1] + a["box"][3]) / 2
    bx, by = (b["box"][0] + b["box"][2]) / 2, (b["box"][1] + b["box"][3]) / 2
    dx, dy = ax - bx, ay - by
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _extent_choices(size: int, which: str) -> list[int]:
    """Integer pixel extents inside the size's fraction range (falls back to the nearest one on tiny canvases)."""
    lo, hi = EXTENT[which]
    choices = list(range(int(np.ceil(lo * size)), int(np.floor(hi * size)) + 1))
    return choices or [max(1, round((lo + hi) / 2 * size))]


def _overlaps(box: list[int], others: list[list[int]]) -> bool:
    return any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3] for o in others)


def place_objects(rng: np.random.Generator, size: int, n: int) -> list[dict]:
    """Pick n objects and non-overlapping boxes by rejection sampling; shrink or drop an object that will not fit."""
    objects: list[dict] = []
    boxes: list[list[int]] = []
    for _ in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = list(COLORS)[rng.integers(len(COLORS))]
        which = SIZES[rng.integers(2)]
        for attempt in range(400):
            if attempt == 200:
                which = "small"  # a large object may not fit beside others; try a small one instead
            choices = _extent_choices(size, which)
            e = int(choices[rng.integers(len(choices))])
            x0, y0 = int(rng.integers(0, size - e + 1)), int(rng.integers(0, size - e + 1))
            box = [x0, y0, x0 + e, y0 + e]
            if not _overlaps(box, boxes):
                break
        else:
            continue  # no room left: fewer objects is still a valid, truthful image
        boxes.append(box)
        objects.append({"shape": shape, "color": color, "size": which,
                        "position": position_word(box, size), "box": box})
    return objects


def render(objects: list[dict], size: int) -> Image.Image:
    """Draw objects at 4x resolution and downsample with box filtering for clean antialiased edges."""
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (size * s, size * s), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        _draw_object(draw, obj, COLORS[obj["color"]])
    return canvas.resize((size, size), Image.BOX)


def object_mask(obj: dict, size: int) -> np.ndarray:
    """The share of each pixel the object covers, (size, size) float32 in [0, 1], drawn as `render` draws it."""
    canvas = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    _draw_object(ImageDraw.Draw(canvas), obj, 255)
    return np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict, fill) -> None:
    x0, y0, x1, y1 = (v * SUPERSAMPLE for v in obj["box"])
    if obj["shape"] == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif obj["shape"] == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    else:  # triangle pointing up, filling the box's width and height
        draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
