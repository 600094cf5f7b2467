"""Grounding targets for text-to-image training: which words of a caption name which pixels.

A scene's objects (colour, shape, box: the Shapes world's annotations) give one phrase per distinct colour-shape
("red circle") with the union of its objects' coverage; `phrase_spans` finds where a caption names a phrase ("a
red circle", "two red circles"), and a text encoder's token offsets (`TextEncoder.token_offsets`) turn those
characters into the token positions whose cross-attention should fall on the phrase's pixels (the grounding loss
of TokenCompose, Wang et al. 2024, whose masks came from a segmenter; the Shapes world draws them exactly).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from .shapes_scene import MAX_OBJECTS, object_mask

MAX_PHRASES = MAX_OBJECTS  # at most one phrase per object


def scene_phrases(objects: Sequence[dict], size: int) -> list[tuple[str, np.ndarray]]:
    """(phrase, mask) per distinct colour-shape of a scene, in order of first appearance: the phrase as captions
    word it ("red circle") and the (size, size) coverage of all its objects (maximum where they overlap)."""
    masks: dict[str, np.ndarray] = {}
    for obj in objects:
        name = f"{obj['color']} {obj['shape']}"
        mask = object_mask(obj, size)
        masks[name] = np.maximum(masks[name], mask) if name in masks else mask
    return list(masks.items())


def phrase_spans(text: str, phrase: str) -> list[tuple[int, int]]:
    """(start, end) characters of each whole-word mention of `phrase` in `text`, a plural "s" included."""
    return [m.span() for m in re.finditer(rf"\b{re.escape(phrase)}s?\b", text)]


def phrase_tokens(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """Token positions (indices into `offsets`) whose characters fall inside any of `spans`; special tokens
    ((0, 0) offsets) never do."""
    return [i for i, (a, b) in enumerate(offsets) if b > a and any(s <= a and b <= e for s, e in spans)]
