"""A non-learned reader of Shapes pictures: colour from pixel statistics, shape from moments, position from the box.

`PixelChecker.predict` returns scenes in the form `ShapesEvaluator.predict` does, so `score_scene` and
`compositional_accuracy` score a generator with it unchanged; `evaluate-t2i` reports both, so that no
text-to-image figure rests on one learned model alone.

How a picture is read (uint8 RGB, any size):
1. Colour: every pixel is unmixed against the dark background along each palette colour's direction,
   p = bg + a (c - bg) + r; the colour with the smallest residual |r| (among those with coverage a >= 0.5)
   owns the pixel. Antialiased edges are partial coverage of one colour, not a third colour.
2. Objects: connected regions of one colour (4-connectivity), too-small regions dropped as noise.
   A region far from the shape it reads as (step 3, drawn the world's way) is touching objects of one colour:
   it is split by 2-means on pixel positions until every part is one shape.
3. Shape from the region's moments (`shape_moments`), which survive resizing and blur: a triangle's mass sits low
   (vertical skewness), a square's diagonal marginals are more peaked than its axis ones (kurtosis), a circle
   has neither.
4. Position: the box centre, from the centroid and spread of the shape read, as the world defines positions and
   relations (shapes_scene.position_word and relation use box centres; a triangle's centroid lies lower).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from imagen.data.shapes_scene import BACKGROUND, COLORS, render

_NAMES = list(COLORS)
_BG = np.asarray(BACKGROUND, dtype=np.float64)
_DIRS = np.asarray([COLORS[n] for n in _NAMES], dtype=np.float64) - _BG  # (6, 3): each colour's direction from bg
MIN_COVERAGE = 0.5  # a pixel belongs to an object when at least half of it is that object's colour
MIN_AREA_FRACTION = 0.006  # regions smaller than this share of the canvas are noise (the smallest object: ~3 %)
TRIANGLE_SKEW = -0.3  # vertical skewness below this: an upward triangle (-0.6; squares and circles 0)
SQUARE_KURTOSIS = 0.3  # diagonal minus axis kurtosis above this: a square (0.6; circles and triangles 0)
MIN_PART_FRACTION = 0.02  # 2/3 of the smallest object's area (a small triangle: 3.1 % of the canvas)
MAX_TEMPLATE_ERROR = 0.35  # a region farther than this from its shape holds touching objects (template_error)


def coverage_maps(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) RGB -> (colour index per pixel, -1 for background; coverage of that colour per pixel, 0..1)."""
    p = image.reshape(-1, 3).astype(np.float64) - _BG
    alpha = p @ _DIRS.T / (_DIRS * _DIRS).sum(1)  # (N, 6): coverage along each colour's direction
    resid = np.linalg.norm(p[:, None, :] - alpha[..., None] * _DIRS[None], axis=2)  # (N, 6)
    resid = np.where(alpha >= MIN_COVERAGE, resid, np.inf)
    best = resid.argmin(1)
    a = np.clip(alpha[np.arange(len(p)), best], 0.0, 1.0)
    label = np.where(np.isfinite(resid.min(1)), best, -1)
    h, w = image.shape[:2]
    return label.reshape(h, w), np.where(label >= 0, a, 0.0).reshape(h, w)


def _alpha_along(image: np.ndarray, ci: int) -> np.ndarray:
    """(H, W) coverage of every pixel along colour ci's direction (unclipped)."""
    p = image.astype(np.float64) - _BG
    return p @ _DIRS[ci] / (_DIRS[ci] @ _DIRS[ci])


def shape_moments(m: np.ndarray) -> dict[str, float]:
    """Moments of a coverage map m (H, W): area, centroid (cx, cy), spreads (sx, sy), vertical skewness and how much
    more peaked the diagonal marginals are than the axis ones (kurtosis difference).

    Drawn shapes, exactly and after resizing (16 -> 32, 64 -> 32): a square has kurtosis difference ~0.6 (its
    axis marginals are flat, its diagonal ones triangular), a circle ~0 (isotropic), an upward triangle skewness
    ~-0.6 (its mass sits low) where the others have 0."""
    ys, xs = np.mgrid[:m.shape[0], :m.shape[1]] + 0.5  # pixel i covers [i, i + 1): its centre is i + 0.5
    area = float(m.sum())
    cx, cy = float((m * xs).sum() / area), float((m * ys).sum() / area)
    dx, dy = xs - cx, ys - cy

    def mom(u, k):
        # A pixel is a unit square, not a point: its own spread (1/12 along any axis) keeps a one-pixel line finite.
        return float((m * u ** k).sum() / area) + (1 / 12 if k == 2 else 0.0)

    sx, sy = np.sqrt(mom(dx, 2)), np.sqrt(mom(dy, 2))
    d1, d2 = (dx + dy) / np.sqrt(2), (dx - dy) / np.sqrt(2)
    axis = (mom(dx, 4) / sx ** 4 + mom(dy, 4) / sy ** 4) / 2
    diagonal = (mom(d1, 4) / mom(d1, 2) ** 2 + mom(d2, 4) / mom(d2, 2) ** 2) / 2
    return {"area": area, "cx": cx, "cy": cy, "sx": float(sx), "sy": float(sy),
            "skew": mom(dy, 3) / sy ** 3, "kurtosis_diff": diagonal - axis}


def classify_shape(mo: dict[str, float]) -> tuple[str, float, float, float]:
    """(shape, box centre x, box centre y, box extent) from a region's moments (see shape_moments)."""
    if mo["skew"] < TRIANGLE_SKEW:
        h = mo["sy"] * np.sqrt(18.0)  # an upward triangle of height h: vertical spread h / sqrt(18), centroid 2h/3 down
        return "triangle", mo["cx"], mo["cy"] - h / 6, h
    s = (mo["sx"] + mo["sy"]) / 2
    if mo["kurtosis_diff"] > SQUARE_KURTOSIS:
        return "square", mo["cx"], mo["cy"], s * np.sqrt(12.0)  # side s: spread s / sqrt(12)
    return "circle", mo["cx"], mo["cy"], 4 * s  # diameter d: spread d / 4


def template_error(m: np.ndarray, mo: dict[str, float]) -> float:
    """How far a region is from the shape its moments read: |m - t| summed over its area, t being that shape drawn
    the world's way in the box read. Drawn shapes: at most 0.13 at 32 px, 0.16 after 64 -> 32, 0.33 after
    16 -> 32; touching objects of one colour: mostly above 0.4."""
    shape, cx, cy, extent = classify_shape(mo)
    box = [cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2]
    drawn = np.asarray(render([{"shape": shape, "color": _NAMES[0], "box": box}], m.shape[0]), dtype=np.float64)
    t = np.clip((drawn - _BG) @ _DIRS[0] / (_DIRS[0] @ _DIRS[0]), 0.0, 1.0)
    return float(np.abs(m - t).sum() / max(m.sum(), 1e-9))


def _split_two(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two parts of a coverage map by weighted 2-means on pixel positions, started at its ends along the main axis."""
    ys, xs = np.nonzero(m > 0)
    w = m[ys, xs]
    pts = np.stack([xs, ys], 1).astype(np.float64)
    mean = (pts * w[:, None]).sum(0) / w.sum()
    cov = np.cov((pts - mean).T, aweights=w)
    axis = np.linalg.eigh(cov)[1][:, -1]
    proj = (pts - mean) @ axis
    centres = np.stack([pts[proj.argmin()], pts[proj.argmax()]])
    for _ in range(20):
        near = ((pts[:, None, :] - centres[None]) ** 2).sum(2).argmin(1)
        new = np.stack([(pts[near == j] * w[near == j, None]).sum(0) / max(w[near == j].sum(), 1e-9) for j in (0, 1)])
        if np.allclose(new, centres):
            break
        centres = new
    a, b = np.zeros_like(m), np.zeros_like(m)
    a[ys[near == 0], xs[near == 0]] = w[near == 0]
    b[ys[near == 1], xs[near == 1]] = w[near == 1]
    return a, b


def _regions(m: np.ndarray, depth: int = 0) -> list[np.ndarray]:
    """One coverage map per object: a region far from the shape it reads as (template_error) is touching objects
    of one colour, split in two until each part is one shape (at most four parts)."""
    if depth >= 2 or (m > 0).sum() < 4 or template_error(m, shape_moments(m)) <= MAX_TEMPLATE_ERROR:
        return [m]
    parts = _split_two(m)
    if min(part.sum() for part in parts) < MIN_PART_FRACTION * m.shape[0] ** 2:
        return [m]  # a part smaller than any object the world draws: one small blurred shape, not two
    return [r for part in parts for r in _regions(part, depth + 1)]


def read_objects(image: np.ndarray) -> list[dict]:
    """Objects of one (H, W, 3) uint8 picture: [{"color", "shape", "box", "cell", "center", "area"}], largest first."""
    size = image.shape[0]
    label, _ = coverage_maps(image)
    objects = []
    for ci, name in enumerate(_NAMES):
        if not (label == ci).any():
            continue
        along = np.clip(_alpha_along(image, ci), 0.0, 1.0)  # once per colour, shared by its regions
        regions, n = ndimage.label(label == ci)  # 4-connectivity: shapes that touch at a corner stay apart
        for k in range(1, n + 1):
            mask = regions == k
            if mask.sum() < MIN_AREA_FRACTION * size * size:
                continue
            # The region's coverage, with the faint edge pixels around it that carry some of its colour (and no
            # pixel that another colour owns).
            near = ndimage.binary_dilation(mask, structure=np.ones((3, 3))) & ((label == ci) | (label < 0))
            cover = np.where(near, along, 0.0)
            for part in _regions(cover):
                if part.sum() < MIN_AREA_FRACTION * size * size:
                    continue
                mo = shape_moments(part)
                shape, cx, cy, extent = classify_shape(mo)
                box = [cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2]
                cx, cy = cx / size, cy / size
                objects.append({"color": name, "shape": shape, "box": [round(float(v), 2) for v in box],
                                "cell": (min(2, max(0, int(cy * 3))), min(2, max(0, int(cx * 3)))),
                                "center": (cx, cy), "area": mo["area"]})
    return sorted(objects, key=lambda o: -o["area"])


class PixelChecker:
    """Reads Shapes scenes from pixels with no learned weights; the same `predict` contract as ShapesEvaluator."""

    name = "pixel"

    def predict(self, images: torch.Tensor) -> list[dict]:
        """uint8 (N, 3, S, S) -> [{"objects": [{"color", "shape", "cell", "center", "box"}], "count": k}]."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"PixelChecker reads uint8 RGB images (N, 3, S, S), got {images.dtype} {tuple(images.shape)}")
        scenes = []
        for img in images.permute(0, 2, 3, 1).cpu().numpy():
            objects = read_objects(img)
            scenes.append({"objects": objects, "count": len(objects)})
        return scenes
