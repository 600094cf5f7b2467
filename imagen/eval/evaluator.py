"""A small CNN that reads Shapes-world images back into scene facts, for scoring text-to-image samples.

`ShapesEvaluator` is trained only on real Shapes renderings (1-3 objects, drawn on the fly from a seed stream
that no dataset split uses). For each image it predicts

- the object count (1..3), from a head over the whole 3 x 3 feature grid;
- for each cell of the 3 x 3 grid the generator's position words come from: "empty" or one of the 18
  colour-shape classes of the object whose box centre lies in that cell;
- for each cell, the centre's offset inside the cell (0..1 along x and y), so relations can be decided from
  continuous centres exactly as `imagen.data.shapes_scene.relation` decides them (see `imagen.eval.t2i`).

The network resizes any input to 36 x 36 (three 12-pixel cells) so its 3 x 3 output grid lines up with the
generator's thirds of the canvas. Approximation: two objects whose centres fall in the same cell (rare: only
small objects in the middle row/column can) are read as one object there; the count head still counts both.

Its globally pooled last features also serve as the feature network for FID (`features`), since no Inception
weights exist offline.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from imagen.atomic import atomic_dir
from imagen.data.images import normalize_images
from imagen.data.shapes_scene import COLORS, MAX_OBJECTS, SHAPES, place_objects, render
from imagen.errors import EvalError

EVALUATOR_VERSION = 1
CLASSES = [(c, s) for c in COLORS for s in SHAPES]  # cell class k + 1; class 0 is "empty"
NUM_CELL_CLASSES = len(CLASSES) + 1
INTERNAL_SIZE = 36  # 3 cells of 12 px; 36 -> 18 -> 9 -> 3 through the pools
TRAIN_SEED = 10_000  # seed streams [TRAIN_SEED, step]: disjoint from dataset splits (ShapesWorld seeds 3*s + split)
HOLDOUT_SEED = 10_001
DEFAULT_STEPS = 1500
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"



# --- helpers ------------------------------------------------------------------------------------------


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where trained evaluators live: cache_dir, else $IMAGEN_CACHE_DIR/evaluators or ~/.cache/imagen/evaluators."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("IMAGEN_CACHE_DIR") or Path.home() / ".cache" / "imagen") / "evaluators"


def scene_targets(objects: list[dict], size: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, cell classes (3, 3) int, centre offsets (3, 3, 2) in [0, 1)) for one rendered scene."""
    cls = np.zeros((3, 3), dtype=np.int64)
    off = np.zeros((3, 3, 2), dtype=np.float32)
    for o in objects:
        x0, y0, x1, y1 = o["box"]
        gx, gy = (x0 + x1) / 2 * 3 / size, (y0 + y1) / 2 * 3 / size
        col, row = min(2, int(gx)), min(2, int(gy))  # the same cell rule as shapes_scene.position_word
        cls[row, col] = 1 + CLASSES.index((o["color"], o["shape"]))
        off[row, col] = (min(gx - col, 1.0), min(gy - row, 1.0))
    return len(objects), cls, off


def sample_batch(rng: np.random.Generator, n: int, size: int, min_objects: int = 1, max_objects: int = MAX_OBJECTS):
    """n fresh real renderings with targets: images uint8 (n, 3, S, S), count (n,), cells (n, 3, 3), offsets."""
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    counts = np.empty(n, dtype=np.int64)
    cells = np.empty((n, 3, 3), dtype=np.int64)
    offsets = np.empty((n, 3, 3, 2), dtype=np.float32)
    for i in range(n):
        objects = place_objects(rng, size, int(rng.integers(min_objects, max_objects + 1)))
        images[i] = np.asarray(render(objects, size))
        counts[i], cells[i], offsets[i] = scene_targets(objects, size)
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(counts),
            torch.from_numpy(cells), torch.from_numpy(offsets))


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


# --- the model ----------------------------------------------------------------------------------------


class ShapesEvaluator(nn.Module):
    """CNN: uint8 Shapes images -> count, per-cell colour-shape class and per-cell centre offset (~110k params)."""

    def __init__(self, size: int = 32, channels: tuple[int, int, int] = (24, 48, 64)):
        super().__init__()
        self.size = int(size)
        self.channels = tuple(int(c) for c in channels)
        c1, c2, c3 = self.channels
        self.stem = nn.Sequential(_block(3, c1), nn.MaxPool2d(2), _block(c1, c2), nn.MaxPool2d(2),
                                  _block(c2, c3), _block(c3, c3), nn.MaxPool2d(3))  # 36 -> 18 -> 9 -> 3
        self.context = _block(c3, c3)  # each cell sees its neighbours (objects straddle cell borders)
        self.cell_head = nn.Conv2d(c3, NUM_CELL_CLASSES + 2, 1)
        self.count_head = nn.Linear(9 * c3, MAX_OBJECTS)
        self.metrics: dict = {}

    @property
    def config(self) -> dict:
        return {"size": self.size, "channels": list(self.channels), "version": EVALUATOR_VERSION,
                "internal_size": INTERNAL_SIZE, "classes": [f"{c} {s}" for c, s in CLASSES], "metrics": self.metrics}

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise EvalError(f"expected images shaped (N, 3, H, W), got {tuple(images.shape)}")
        x = normalize_images(images) if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (INTERNAL_SIZE, INTERNAL_SIZE):
            x = F.interpolate(x, size=(INTERNAL_SIZE, INTERNAL_SIZE), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > INTERNAL_SIZE)
        return x

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, 3, 3) grid features; uint8 images in [0, 255] or floats already in [-1, 1]."""
        return self.context(self.stem(self._prepare(images)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.forward_features(images)
        cell = self.cell_head(h)  # (N, 19 + 2, 3, 3)
        return {"count_logits": self.count_head(h.flatten(1)), "cell_logits": cell[:, :NUM_CELL_CLASSES],
                "offsets": torch.sigmoid(cell[:, NUM_CELL_CLASSES:]).permute(0, 2, 3, 1), "features": h.mean((2, 3))}

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Penultimate features (N, C) averaged over the grid: the FID feature space."""
        self.eval()
        dev = next(self.parameters()).device
        return torch.cat([self(images[i:i + batch_size].to(dev))["features"].float().cpu()
                          for i in range(0, len(images), batch_size)]) if len(images) else torch.zeros(0, self.channels[-1])

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> list[dict]:
        """Scenes [{"objects": [{"color", "shape", "cell": (row, col), "center": (x, y) in 0..1}], "count": k}]."""
        self.eval()
        dev = next(self.parameters()).device
        scenes = []
        for i in range(0, len(images), batch_size):
            out = self(images[i:i + batch_size].to(dev))
            counts = (out["count_logits"].argmax(1) + 1).tolist()
            cells = out["cell_logits"].argmax(1).cpu().numpy()  # (B, 3, 3)
            offs = out["offsets"].float().cpu().numpy()  # (B, 3, 3, 2)
            for b, k in enumerate(counts):
                objects = []
                for r in range(3):
                    for c in range(3):
                        if cells[b, r, c]:
                            color, shape = CLASSES[cells[b, r, c] - 1]
                            ox, oy = offs[b, r, c]
                            objects.append({"color": color, "shape": shape, "cell": (r, c),
                                            "center": (float((c + ox) / 3), float((r + oy) / 3))})
                scenes.append({"objects": objects, "count": int(k)})
        return scenes

    # --- persistence --------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write config.json + model.safetensors into folder `path` atomically, replacing what was there."""
        out = Path(path)
        with atomic_dir(out, replace=True) as tmp:
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME))
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str = "cpu") -> "ShapesEvaluator":
        """Load an evaluator saved by `save` from folder `path`, in eval mode on map_location."""
        path = Path(path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise EvalError(f"{path} holds no Shapes evaluator ({CONFIG_NAME} + {WEIGHTS_NAME}); train one with get_evaluator")
        cfg = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        if cfg.get("version") != EVALUATOR_VERSION:
            raise EvalError(f"{path} holds a version {cfg.get('version')} evaluator; this imagen reads version {EVALUATOR_VERSION}")
        model = cls(size=cfg["size"], channels=tuple(cfg["channels"]))
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME), device=map_location))
        model.metrics = cfg.get("metrics", {})
        return model.to(map_location).eval()


# --- training and checking ------------------------------------------------------------------------


def train_evaluator(size: int = 32, steps: int = DEFAULT_STEPS, seed: int = TRAIN_SEED, device: str = "cpu",
                    batch_size: int = 64, lr: float = 3e-3, noise: float = 0.04, log_every: int = 0) -> ShapesEvaluator:
    """Train a ShapesEvaluator on fresh real renderings (every batch new) drawn from seed stream [seed, step]."""
    torch.manual_seed(seed)
    model = ShapesEvaluator(size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.15)
    model.train()
    t0 = time.time()
    for step in range(steps):
        images, counts, cells, offsets = sample_batch(np.random.default_rng([seed, step]), batch_size, size)
        x = normalize_images(images.to(device))
        if noise > 0:  # a little pixel noise so imperfect generated samples still read well
            x = x + torch.randn_like(x) * (torch.rand(len(x), 1, 1, 1, device=device) * noise)
        out = model(x)
        cells, offsets = cells.to(device), offsets.to(device)
        occupied = cells > 0
        loss = (F.cross_entropy(out["cell_logits"], cells) + F.cross_entropy(out["count_logits"], counts.to(device) - 1)
                + 5.0 * (F.smooth_l1_loss(out["offsets"][occupied], offsets[occupied], beta=0.1) if occupied.any() else 0.0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.1f}s)", flush=True)
    model.eval()
    model.metrics = {"train_steps": steps, "train_seed": seed, "train_seconds": round(time.time() - t0, 1)}
    return model


@torch.no_grad()
def evaluator_accuracy(model: ShapesEvaluator, n: int = 2000, seed: int = HOLDOUT_SEED, size: int | None = None) -> dict[str, float]:
    """Accuracy on n held-out real renderings: count, each of the 9 cells, and per true object its colour,
    shape and position (its cell predicted occupied), plus whole-scene exact match."""
    size = size or model.size
    images, counts, cells, _ = sample_batch(np.random.default_rng([seed, 0]), n, size)
    scenes = model.predict(images)
    pred_counts = torch.tensor([s["count"] for s in scenes])
    pred_cells = torch.zeros(n, 3, 3, dtype=torch.long)
    for i, s in enumerate(scenes):
        for o in s["objects"]:
            pred_cells[i, o["cell"][0], o["cell"][1]] = 1 + CLASSES.index((o["color"], o["shape"]))
    occ = cells > 0
    true_cls, pred_cls = cells[occ] - 1, pred_cells[occ] - 1
    found = pred_cls >= 0
    return {
        "count_accuracy": float((pred_counts == counts).float().mean()),
        "cell_accuracy": float((pred_cells == cells).float().mean()),
        "color_accuracy": float((found & (true_cls // len(SHAPES) == pred_cls // len(SHAPES))).float().mean()),
        "shape_accuracy": float((found & (true_cls % len(SHAPES) == pred_cls % len(SHAPES))).float().mean()),
        "position_accuracy": float(found.float().mean()),
        "scene_accuracy": float(((pred_cells == cells).flatten(1).all(1) & (pred_counts == counts)).float().mean()),
        "n": n,
    }


def get_evaluator(size: int = 32, cache_dir: str | os.PathLike | None = None, steps: int = DEFAULT_STEPS,
                  device: str = "cpu") -> ShapesEvaluator:
    """The evaluator for canvas `size`, trained once and cached (see cache_root); later calls just load it."""
    path = cache_root(cache_dir) / f"shapes-s{int(size)}-n{int(steps)}-v{EVALUATOR_VERSION}"
    if (path / WEIGHTS_NAME).is_file():
        return ShapesEvaluator.load(path, map_location=device)
    model = train_evaluator(size=size, steps=steps, device=device)
    model.metrics.update(evaluator_accuracy(model, n=1000))
    if not (path / WEIGHTS_NAME).is_file():  # another process may have finished first: keep theirs
        model.save(path)
    return model.to(device).eval()
