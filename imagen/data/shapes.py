"""The Shapes world: a deterministic, procedural image + caption + QA + boxes dataset (see DESIGN.md).

`ShapesWorld` draws scenes with `shapes_scene` (vocabulary, placement, drawing) and words them with
`shapes_text` (caption and question templates); `write_shapes` saves a world to disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from imagen.atomic import atomic_dir
from imagen.errors import DataError

from .shapes_scene import COLORS, MAX_OBJECTS, SHAPES, place_objects, render
from .shapes_text import caption, questions

LABEL_KINDS = ("shape", "color", "color-shape", "count")
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


def _labels(objects: list[dict]) -> dict[str, str]:
    """Classification labels of the largest object (first one on ties), plus the object count."""
    big = max(objects, key=lambda o: o["box"][2] - o["box"][0])
    return {"shape": big["shape"], "color": big["color"],
            "color-shape": f"{big['color']} {big['shape']}", "count": str(len(objects))}


MAX_SIZE = 1024  # a canvas is drawn in memory; 100000 pixels a side would take 30 GB


class ShapesWorld:
    """Deterministic Shapes generator: sample(index) depends only on (seed, index)."""

    def __init__(self, seed: int = 0, size: int = 32, lang: str = "en", min_objects: int = 1, max_objects: int = 3):
        if lang not in ("en", "zh"):
            raise DataError(f"unknown Shapes language {lang!r}; choose 'en' or 'zh'")
        if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
            raise DataError(f"Shapes object counts must satisfy 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
                            f"got {min_objects}..{max_objects}")
        if not 8 <= size <= MAX_SIZE:
            raise DataError(f"Shapes canvas size {size} is out of range; use 8 to {MAX_SIZE} pixels")
        self.seed, self.size, self.lang = int(seed), int(size), lang
        self.min_objects, self.max_objects = min_objects, max_objects

    def _scene(self, index: int) -> tuple[np.random.Generator, list[dict]]:
        """The sample's random stream and its objects, placed; the stream then words the caption and questions."""
        rng = np.random.default_rng([self.seed, int(index)])
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        return rng, place_objects(rng, self.size, n)

    def sample(self, index: int) -> dict:
        """Render sample `index`: image, caption, objects, questions and labels."""
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
    world = ShapesWorld(seed=seed, size=size, lang=lang, max_objects=max_objects)
    with atomic_dir(out) as tmp:  # an interrupted run never leaves a half dataset
        (tmp / "images").mkdir()
        with open(tmp / "annotations.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                s = world.sample(i)
                rel = f"images/{i:06d}.png"
                s["image"].save(tmp / rel)
                row = {"image": rel, "text": s["text"], "objects": s["objects"],
                       "questions": s["questions"], "labels": s["labels"]}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out
