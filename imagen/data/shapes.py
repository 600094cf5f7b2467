"""The Shapes world: a deterministic, procedural image + caption + QA + boxes dataset (see DESIGN.md)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from imagen.errors import DataError

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
LABEL_KINDS = ("shape", "color", "color-shape", "count")
# Row-major 3 x 3 grid of position words, indexed [row][col].
POSITIONS = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))
# Extent ranges (fraction of the canvas side); the gap between them keeps "small" and "large" visibly distinct.
EXTENT = {"small": (0.25, 0.33), "large": (0.37, 0.45)}
SUPERSAMPLE = 4
MAX_OBJECTS = 3
# Other captions of each scene, drawn from the same templates with their own random streams: text-to-image
# training draws one of the caption and its paraphrases per visit (as COCO's five captions per image are used).
PARAPHRASES = 7


def class_names(label_kind: str) -> list[str]:
    """The stable, ordered class list for a Shapes label kind."""
    if label_kind == "shape":
        return list(SHAPES)
    if label_kind == "color":
        return list(COLORS)
    if label_kind == "color-shape":
        return [f"{c} {s}" for c in COLORS for s in SHAPES]
    if label_kind == "count":
        return [str(k) for k in range(1, MAX_OBJECTS + 1)]
    raise DataError(f"unknown Shapes label kind {label_kind!r}; choose one of: {', '.join(LABEL_KINDS)}")


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


def _place(rng: np.random.Generator, size: int, n: int) -> list[dict]:
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
        x0, y0, x1, y1 = (v * s for v in obj["box"])
        fill = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        else:  # triangle pointing up, filling the box's width and height
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
    return canvas.resize((size, size), Image.BOX)


def _labels(objects: list[dict]) -> dict[str, str]:
    """Classification labels of the largest object (first one on ties), plus the object count."""
    big = max(objects, key=lambda o: o["box"][2] - o["box"][0])
    return {"shape": big["shape"], "color": big["color"],
            "color-shape": f"{big['color']} {big['shape']}", "count": str(len(objects))}


class ShapesWorld:
    """Deterministic Shapes generator: sample(index) depends only on (seed, index)."""

    def __init__(self, seed: int = 0, size: int = 32, lang: str = "en", min_objects: int = 1, max_objects: int = 3):
        if lang not in ("en", "zh"):
            raise DataError(f"unknown Shapes language {lang!r}; choose 'en' or 'zh'")
        if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
            raise DataError(f"Shapes object counts must satisfy 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
                            f"got {min_objects}..{max_objects}")
        if size < 8:
            raise DataError(f"Shapes canvas size {size} is too small; use at least 8 pixels")
        self.seed, self.size, self.lang = int(seed), int(size), lang
        self.min_objects, self.max_objects = min_objects, max_objects

    def _scene(self, index: int) -> tuple[np.random.Generator, list[dict]]:
        """The sample's random stream and its objects, placed; the stream then words the caption and questions."""
        rng = np.random.default_rng([self.seed, int(index)])
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        return rng, _place(rng, self.size, n)

    def sample(self, index: int) -> dict:
        """Render sample `index`: image, caption, objects, questions and labels."""
        from .shapes_text import caption, questions  # text templates live in their own module

        rng, objects = self._scene(index)
        return {
            "id": f"shapes-{self.seed}-{index:06d}",
            "image": render(objects, self.size),
            "text": caption(objects, rng, self.lang),
            "objects": objects,
            "questions": questions(objects, rng, self.lang),
            "labels": _labels(objects),
        }

    def captions(self, index: int) -> list[str]:
        """Sample `index`'s caption, then PARAPHRASES more, each from its own stream; nothing is rendered.

        Kept out of `sample`, which every Shapes task reads: the paraphrases would make it 1.7x slower.
        """
        from .shapes_text import caption

        rng, objects = self._scene(index)
        return [caption(objects, rng, self.lang)] + [
            caption(objects, np.random.default_rng([self.seed, int(index), k]), self.lang) for k in range(1, PARAPHRASES + 1)]


def write_shapes(out_dir: str | os.PathLike, n: int, seed: int, size: int = 32, lang: str = "en",
                 max_objects: int = 3) -> Path:
    """Write n Shapes samples as images/NNNNNN.png plus annotations.jsonl, atomically; returns out_dir."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"output folder {out} already exists and is not empty; choose a new --out or remove it")
    if n < 1:
        raise DataError(f"number of Shapes samples must be at least 1, got {n}")
    out.parent.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld(seed=seed, size=size, lang=lang, max_objects=max_objects)
    # Build in a sibling temp dir and rename at the end, so an interrupted run never leaves a half dataset.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        with open(tmp / "annotations.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                s = world.sample(i)
                rel = f"images/{i:06d}.png"
                s["image"].save(tmp / rel)
                row = {"image": rel, "text": s["text"], "objects": s["objects"],
                       "questions": s["questions"], "labels": s["labels"]}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a directory on every platform
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
