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

# How scenes are composed. "uniform" (the default, every task's): 1 to max_objects objects, each count equally
# likely; a pair of different objects is captioned by its relation 35 % of the time. "compositional" (for
# text-to-image): kinds of scene drawn with these shares, so two-object and counted captions, the ones a generator
# finds hard, are a larger part of the data: a single object; a "pair" of different colour-shapes (captioned by
# their relation half of the time, else named side by side); a "group" of 2 or 3 identical objects (counted:
# "two green triangles"); a "triple" of any three objects.
SCENE_MIXES: dict[str, dict[str, float] | None] = {
    "uniform": None,
    "compositional": {"single": 0.25, "pair": 0.45, "group": 0.20, "triple": 0.10},
}
PAIR_RELATION_SHARE = {"uniform": 0.35, "compositional": 0.5}


def scene_mix(mix: str, spec: str | None = None) -> dict[str, float] | None:
    """The shares of a scene mix by name (None: uniform), or a one-line DataError naming the choices (and the data
    spec the name came from, when given)."""
    if mix not in SCENE_MIXES:
        where = f" (in {spec!r})" if spec is not None else ""
        raise DataError(f"unknown Shapes scene mix {mix!r}{where}; choose one of: {', '.join(SCENE_MIXES)}")
    return SCENE_MIXES[mix]


class ShapesWorld:
    """Deterministic Shapes generator: sample(index) depends only on (seed, index)."""

    def __init__(self, seed: int = 0, size: int = 32, lang: str = "en", min_objects: int = 1, max_objects: int = 3,
                 mix: str = "uniform"):
        if lang not in ("en", "zh"):
            raise DataError(f"unknown Shapes language {lang!r}; choose 'en' or 'zh'")
        if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
            raise DataError(f"Shapes object counts must satisfy 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
                            f"got {min_objects}..{max_objects}")
        if not 8 <= size <= MAX_SIZE:
            raise DataError(f"Shapes canvas size {size} is out of range; use 8 to {MAX_SIZE} pixels")
        if scene_mix(mix) is not None and (min_objects, max_objects) != (1, MAX_OBJECTS):
            raise DataError(f"the {mix!r} scene mix draws 1 to {MAX_OBJECTS} objects itself; "
                            f"leave min_objects / max_objects at 1 / {MAX_OBJECTS}")
        self.seed, self.size, self.lang = int(seed), int(size), lang
        self.min_objects, self.max_objects = min_objects, max_objects
        self.mix, self.p_relation = mix, PAIR_RELATION_SHARE[mix]

    def _scene(self, index: int) -> tuple[np.random.Generator, list[dict]]:
        """The sample's random stream and its objects, placed; the stream then words the caption and questions."""
        rng = np.random.default_rng([self.seed, int(index)])
        shares = SCENE_MIXES[self.mix]
        if shares is None:
            n = int(rng.integers(self.min_objects, self.max_objects + 1))
            return rng, place_objects(rng, self.size, n)
        kind = list(shares)[int(rng.choice(len(shares), p=list(shares.values())))]
        n = {"single": 1, "pair": 2, "group": int(rng.integers(2, 4)), "triple": 3}[kind]
        objects = place_objects(rng, self.size, n)
        if kind == "group":  # every object takes the first one's colour and shape
            for obj in objects[1:]:
                obj["color"], obj["shape"] = objects[0]["color"], objects[0]["shape"]
        elif kind == "pair" and len(objects) == 2 and objects[1]["color"] == objects[0]["color"] \
                and objects[1]["shape"] == objects[0]["shape"]:  # a pair names two different things
            others = [c for c in COLORS if c != objects[0]["color"]]
            objects[1]["color"] = others[int(rng.integers(len(others)))]
        return rng, objects

    def sample(self, index: int) -> dict:
        """Render sample `index`: image, caption, objects, questions and labels."""
        rng, objects = self._scene(index)
        return {
            "id": f"shapes-{self.seed}-{index:06d}",
            "image": render(objects, self.size),
            "text": caption(objects, rng, self.lang, self.p_relation),
            "objects": objects,
            "questions": questions(objects, rng, self.lang),
            "labels": _labels(objects),
        }

    def captions(self, index: int) -> list[str]:
        """Sample `index`'s caption, then PARAPHRASES more, each from its own stream; nothing is rendered.

        Kept out of `sample`, which every Shapes task reads: the paraphrases would make it 1.7x slower.
        """
        rng, objects = self._scene(index)
        return [caption(objects, rng, self.lang, self.p_relation)] + [
            caption(objects, np.random.default_rng([self.seed, int(index), k]), self.lang, self.p_relation)
            for k in range(1, PARAPHRASES + 1)]


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
