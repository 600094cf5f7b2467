"""Text-to-image evaluation on the Shapes world: compositional accuracy, FID and a CLIPScore-style alignment.

- `compositional_prompts` draws held-out Shapes scenes and words them with the dataset's own templates, in four
  categories: "single" ("a red circle", optionally "... in the top left"), "relation" ("a red circle to the
  left of a blue square"), "count" ("two green triangles") and "and" ("a purple circle and a green circle").
  Each prompt carries its expected facts. The first three categories' prompts do not change when a category is
  added (each draws from its own seed stream).
- A generator's images are read back by `ShapesEvaluator` (imagen.eval.evaluator) and `score_scene` checks
  the facts (GenEval-style, on a world where the checker can be trained to near-perfect accuracy).
- `fid` is the Fréchet distance between Gaussian fits of features from a network the project trains itself
  (the evaluator's penultimate layer by default): no Inception weights exist offline. `inception_fid` takes
  a TorchScript Inception feature extractor that a user supplies (nothing is downloaded).
- `alignment_score` is CLIPScore (Hessel et al. 2021) with our pretrained encoder's ITC projections.

Expected scene facts (a dict): {"objects": [{"color", "shape", "cell": (row, col) or None, "box": [x0, y0, x1,
y1]}], "count": k, "relation": {"subject": i, "object": j, "relation": "left of"} or None, "canvas": S}.
A non-None "cell" means the prompt states the object's position; "box" (pixels on an S canvas) lets
`render_expected` draw the true scene.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence
from typing import Any
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imagen.data.images import normalize_images
from imagen.data.shapes import ShapesWorld
from imagen.data.shapes_scene import POSITIONS, relation, render
from imagen.data.shapes_text import group_phrase, object_name, object_phrase, objects_phrase, relation_phrase

from .evaluator import EvalError, ShapesEvaluator

CATEGORIES = ("single", "relation", "count", "and")
PROMPT_SEED = 20_000  # default held-out seed stream, disjoint from dataset splits and the evaluator's training
RELATION_TOLERANCE = 0.05  # fraction of the canvas by which the off axis may exceed the relation's axis
CELL_OF_POSITION = {word: (r, c) for r, row in enumerate(POSITIONS) for c, word in enumerate(row)}


# --- prompts ----------------------------------------------------------------------------------------


def _fact(obj: dict, with_pos: bool) -> dict:
    return {"color": obj["color"], "shape": obj["shape"], "box": list(obj["box"]),
            "cell": CELL_OF_POSITION[obj["position"]] if with_pos else None}


def _scenes(seed: int, size: int, n_objects: int, offset: int):
    """Held-out ShapesWorld scenes with exactly n_objects objects (seed stream [seed + offset, i])."""
    world = ShapesWorld(seed=seed + offset, size=size, min_objects=n_objects, max_objects=n_objects)
    for i in itertools.count():
        objects = world.sample(i)["objects"]
        if len(objects) == n_objects:  # placement may drop an object that does not fit
            yield i, objects


def compositional_prompts(n_per_category: int, seed: int = PROMPT_SEED, lang: str = "en", size: int = 32) -> list[dict]:
    """n_per_category prompts of each category: [{"prompt", "category", "expected"}], deterministic in seed."""
    if lang not in ("en", "zh"):
        raise EvalError(f"unknown prompt language {lang!r}; choose 'en' or 'zh'")
    out: list[dict] = []
    # single: one object, its position stated in half of the prompts
    for j, (_, objects) in enumerate(itertools.islice(_scenes(seed, size, 1, 0), n_per_category)):
        with_pos = j % 2 == 1
        out.append({"prompt": object_phrase(objects[0], lang, with_pos=with_pos), "category": "single",
                    "expected": {"objects": [_fact(objects[0], with_pos)], "count": 1, "relation": None, "canvas": size}})
    # relation: two different colour-shapes and the generator's relation of the first to the second
    scenes = ((i, o) for i, o in _scenes(seed, size, 2, 1) if object_name(o[0], "en") != object_name(o[1], "en"))
    for _, (a, b) in itertools.islice(scenes, n_per_category):
        rel = relation(a, b)
        out.append({"prompt": relation_phrase(a, b, lang), "category": "relation",
                    "expected": {"objects": [_fact(a, False), _fact(b, False)], "count": 2,
                                 "relation": {"subject": 0, "object": 1, "relation": rel}, "canvas": size}})
    # count: two or three identical objects (placement from a real scene, then one colour-shape for all)
    streams = {k: _scenes(seed, size, k, 1 + k) for k in (2, 3)}
    for j in range(n_per_category):
        k = 2 + j % 2
        _, objects = next(streams[k])
        rng = np.random.default_rng([seed, 7, j])
        color, shape = objects[int(rng.integers(k))]["color"], objects[int(rng.integers(k))]["shape"]
        facts = [{"color": color, "shape": shape, "box": list(o["box"]), "cell": None} for o in objects]
        out.append({"prompt": group_phrase(color, shape, k, lang), "category": "count",
                    "expected": {"objects": facts, "count": k, "relation": None, "canvas": size}})
    # and: two different colour-shapes named side by side ("a purple circle and a green circle"), no relation stated:
    # what fails there is binding (right colours on the wrong shapes) and doubling (one shape drawn twice)
    scenes = ((i, o) for i, o in _scenes(seed, size, 2, 10) if object_name(o[0], "en") != object_name(o[1], "en"))
    for _, objects in itertools.islice(scenes, n_per_category):
        out.append({"prompt": objects_phrase(objects, lang), "category": "and",
                    "expected": {"objects": [_fact(o, False) for o in objects], "count": 2, "relation": None,
                                 "canvas": size}})
    return out


def render_expected(expected: dict, size: int | None = None) -> torch.Tensor:
    """The true scene of a prompt drawn the Shapes way: uint8 (3, S, S); boxes rescale to another canvas size."""
    canvas = int(expected.get("canvas", 32))
    size = int(size or canvas)
    scale = size / canvas
    objects = [{"color": o["color"], "shape": o["shape"], "box": [round(v * scale) for v in o["box"]]}
               for o in expected["objects"]]
    return torch.from_numpy(np.asarray(render(objects, size)).copy()).permute(2, 0, 1).contiguous()


def reference_generator(prompts: Sequence[dict], size: int | None = None) -> Callable[[list[str]], torch.Tensor]:
    """A perfect 'generator' for sanity checks: returns each prompt's true scene (looked up by prompt text)."""
    truth = {p["prompt"]: p["expected"] for p in prompts}
    return lambda texts: torch.stack([render_expected(truth[t], size) for t in texts])


# --- scoring -------------------------------------------------------------------------------------------


def _center(obj: dict) -> tuple[float, float]:
    """Predicted object centre in canvas fractions; falls back to its cell's middle."""
    if obj.get("center") is not None:
        return float(obj["center"][0]), float(obj["center"][1])
    r, c = obj["cell"]
    return (c + 0.5) / 3, (r + 0.5) / 3


def relation_holds(a: dict, b: dict, rel: str, tolerance: float = RELATION_TOLERANCE) -> bool:
    """Whether predicted object a stands in `rel` to b. Mirrors shapes_scene.relation (dominant axis of the centre
    offset) with slack: the relation's axis must have the right sign and may be shorter than the other axis by
    at most `tolerance` (canvas fraction), since centres read from pixels are not exact."""
    (ax, ay), (bx, by) = _center(a), _center(b)
    dx, dy = ax - bx, ay - by
    main, other, sign = {"left of": (dx, dy, -1), "right of": (dx, dy, 1), "above": (dy, dx, -1),
                         "below": (dy, dx, 1)}[rel]
    return main * sign > 0 and abs(main) >= abs(other) - tolerance


def score_scene(expected: dict, predicted: dict, tolerance: float = RELATION_TOLERANCE) -> dict[str, bool]:
    """Per-check pass/fail and "correct" (all applicable checks pass).

    Expected objects are matched one-to-one to predicted objects by the assignment that agrees most (whole
    objects first, then single attributes). Checks: "count" (predicted count == expected count; captions name
    every object, so extra objects are wrong), "color" and "shape" (every expected object's matched object has
    that attribute; a missing object fails both, and a swapped binding fails one), "position" (only when the
    prompt states a position: matched object in that cell) and "relation" (only for relation prompts).
    """
    exp_objs, pred_objs = expected["objects"], list(predicted.get("objects", []))
    m = len(exp_objs)
    rel = expected.get("relation")
    padded = pred_objs + [None] * max(0, m - len(pred_objs))

    def agree(e, p, key):
        if p is None:
            return False
        return tuple(p["cell"]) == tuple(e["cell"]) if key == "cell" else p[key] == e[key]

    best, best_key = None, None
    for perm in itertools.permutations(range(len(padded)), m):
        pairs = [(e, padded[j]) for e, j in zip(exp_objs, perm)]
        whole = sum(all(agree(e, p, k) for k in ("color", "shape")) and (e["cell"] is None or agree(e, p, "cell"))
                    for e, p in pairs)
        parts = sum(agree(e, p, k) for e, p in pairs for k in ("color", "shape")) + \
            sum(agree(e, p, "cell") for e, p in pairs if e["cell"] is not None)
        rel_ok = False
        if rel:
            a, b = pairs[rel["subject"]][1], pairs[rel["object"]][1]
            rel_ok = a is not None and b is not None and relation_holds(a, b, rel["relation"], tolerance)
        key = (whole, parts, rel_ok)
        if best_key is None or key > best_key:
            best, best_key = pairs, key
    best = best or []
    checks = {
        "count": int(predicted.get("count", len(pred_objs))) == int(expected["count"]),
        "color": all(agree(e, p, "color") for e, p in best),
        "shape": all(agree(e, p, "shape") for e, p in best),
    }
    if any(e["cell"] is not None for e in exp_objs):
        checks["position"] = all(agree(e, p, "cell") for e, p in best if e["cell"] is not None)
    if rel:
        checks["relation"] = bool(best_key[2])
    checks["correct"] = all(checks.values())
    return checks


FAILURE_KINDS = ("correct", "missing object", "extra object", "binding swapped", "shape wrong", "colour wrong",
                 "colour and shape wrong", "position wrong", "relation wrong")


def failure_kind(expected: dict, predicted: dict, checks: dict[str, bool]) -> str:
    """What went wrong with one picture, the first that applies of FAILURE_KINDS: an object missing or extra
    (the count or objects read vs those named), "binding swapped" (the colours and the shapes named are all there,
    paired wrongly: "a purple circle and a green square" drawn as a purple square and a green circle), a shape
    or colour wrong (a shape drawn twice counts here), then a stated position or relation. `checks` is
    score_scene's result for the same scene."""
    if checks["correct"]:
        return "correct"
    read = list(predicted.get("objects", []))
    named = expected["objects"]
    if not checks["count"] or len(read) != len(named):  # a reader's count and the objects it placed may differ
        n_read = min(int(predicted.get("count", len(read))), len(read))
        return "missing object" if n_read < int(expected["count"]) else "extra object"
    same_colours = sorted(o["color"] for o in read) == sorted(o["color"] for o in named)
    same_shapes = sorted(o["shape"] for o in read) == sorted(o["shape"] for o in named)
    if not (checks["color"] and checks["shape"]):
        if same_colours and same_shapes:
            return "binding swapped"
        if same_colours:
            return "shape wrong"
        return "colour wrong" if same_shapes else "colour and shape wrong"
    return "position wrong" if not checks.get("position", True) else "relation wrong"


def compositional_accuracy(generate_fn: Callable[[list[str]], torch.Tensor], prompts: Sequence[dict], evaluator,
                           batch_size: int = 16, cross_check=None, records: list | None = None) -> dict[str, float]:
    """Generate every prompt, read the images back with the evaluator and aggregate score_scene.

    Keys: compositional_accuracy (share fully correct), {single,relation,count,and}_accuracy (per category; NaN when
    a category has no prompts), color/shape/position_accuracy (share of prompts passing that check, where it
    applies), count/relation_check_accuracy and n. generate_fn(list[str]) -> uint8 (N, 3, S, S).

    `cross_check` is a second reader of the same images (e.g. the non-learned `PixelChecker`): its figures come
    under its name as a prefix ("pixel_relation_accuracy", ...), with "<name>_agreement", the share of prompts on
    whose correctness both readers agree, and "<name>_failures" / "failures": {category: {failure kind: prompts}}.

    `records`, when given, gets one dict per prompt: its prompt, category and, per reader ("evaluator", and the
    cross check's name), whether it was correct, its failure kind and the objects read (colour, shape, cell)."""
    readers = [("", evaluator)] + ([(f"{cross_check.name}_", cross_check)] if cross_check is not None else [])
    scores: dict[str, list[tuple[str, dict]]] = {prefix: [] for prefix, _ in readers}
    kinds = {prefix: {cat: dict.fromkeys(FAILURE_KINDS, 0) for cat in CATEGORIES} for prefix, _ in readers}
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        images = generate_fn([p["prompt"] for p in chunk])
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(chunk):
            raise EvalError(f"generate_fn must return uint8 images (N, 3, S, S) with N = {len(chunk)} prompts")
        rows = [{"prompt": p["prompt"], "category": p["category"]} for p in chunk]
        for prefix, reader in readers:
            for p, scene, row in zip(chunk, reader.predict(images), rows):
                checks = score_scene(p["expected"], scene)
                kind = failure_kind(p["expected"], scene, checks)
                scores[prefix].append((p["category"], checks))
                kinds[prefix][p["category"]][kind] += 1
                row[prefix.rstrip("_") or "evaluator"] = {
                    "correct": checks["correct"], "failure": kind,
                    "read": [[o["color"], o["shape"], list(o["cell"])] for o in scene.get("objects", [])]}
        if records is not None:
            records.extend(rows)
    out: dict[str, Any] = {}
    for prefix, rows in scores.items():
        out.update({prefix + k: v for k, v in _aggregate(rows).items()})
        out[prefix + "failures"] = {cat: {k: n for k, n in kinds[prefix][cat].items() if n} for cat in CATEGORIES}
    if cross_check is not None:
        pairs = zip(scores[""], scores[f"{cross_check.name}_"])
        out[f"{cross_check.name}_agreement"] = float(np.mean([a["correct"] == b["correct"] for (_, a), (_, b) in pairs]))
    return out


def _aggregate(scores: list[tuple[str, dict]]) -> dict[str, float]:
    """compositional_accuracy's keys from (category, score_scene result) rows."""
    def share(rows: list[dict], key: str) -> float:
        vals = [r[key] for r in rows if key in r]
        return float(np.mean(vals)) if vals else float("nan")

    rows = [s for _, s in scores]
    out = {"compositional_accuracy": share(rows, "correct")}
    for cat in CATEGORIES:
        out[f"{cat}_accuracy"] = share([s for c, s in scores if c == cat], "correct")
    for key in ("color", "shape", "position", "count", "relation"):
        out[f"{key}_check_accuracy" if key in ("count", "relation") else f"{key}_accuracy"] = share(rows, key)
    out["n"] = len(rows)
    return out


def paired_accuracy_difference(records: Sequence[dict], reference: Sequence[dict], reader: str = "evaluator") -> tuple[float, float]:
    """Accuracy of `records` minus that of `reference` (rows of RUN/eval/t2i-shapes-prompts.jsonl, the same prompts in
    the same order, sampled from the same seeds) as read by `reader` ("evaluator" or "pixel"), and the standard error
    of that difference from the per-prompt differences (each -1, 0 or 1). Pairs that agree cancel, so a sampler or a
    distilled run that draws what its teacher drew is measured far more tightly than two independent accuracies."""
    if [r["prompt"] for r in records] != [r["prompt"] for r in reference]:
        raise ValueError("paired accuracies need the same prompts in the same order")
    d = np.array([float(a[reader]["correct"]) - float(b[reader]["correct"]) for a, b in zip(records, reference)])
    if len(d) == 0:
        raise ValueError("paired accuracies need at least one prompt")
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


# --- FID -----------------------------------------------------------------------------------------------


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^1/2), in float64.

    tr((C1 C2)^1/2) = tr((C1^1/2 C2 C1^1/2)^1/2) and the inner matrix is symmetric PSD, so two symmetric eigen-
    decompositions (negative round-off clipped to 0) replace a general sqrtm: no complex parts, no blow-ups on
    singular covariances."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    w, v = np.linalg.eigh((cov1 + cov1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ ((cov2 + cov2.T) / 2) @ root1
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_cross)
    return max(value, 0.0)


def _gaussian(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(feats) < 2:
        raise EvalError(f"FID needs at least 2 images per set, got {len(feats)}")
    return feats.mean(0), np.cov(feats, rowvar=False)


def _features(images: torch.Tensor, feature_fn, batch_size: int) -> np.ndarray:
    fn = feature_fn.features if isinstance(feature_fn, ShapesEvaluator) else feature_fn  # its penultimate layer
    with torch.no_grad():
        chunks = [torch.as_tensor(fn(images[i:i + batch_size])).float().reshape(len(images[i:i + batch_size]), -1).cpu()
                  for i in range(0, len(images), batch_size)]
    return torch.cat(chunks).double().numpy()


def fid(real: torch.Tensor, fake: torch.Tensor, feature_fn, batch_size: int = 256) -> float:
    """Fréchet distance between Gaussian fits of feature_fn(real) and feature_fn(fake) (uint8 (N, 3, S, S)).

    feature_fn: images -> (N, D) features, e.g. a ShapesEvaluator (its penultimate layer) or its .features."""
    mu1, c1 = _gaussian(_features(real, feature_fn, batch_size))
    mu2, c2 = _gaussian(_features(fake, feature_fn, batch_size))
    return frechet_distance(mu1, c1, mu2, c2)


def inception_fid(real: torch.Tensor, fake: torch.Tensor, weights_path, batch_size: int = 64) -> float:
    """Standard FID with a user-supplied TorchScript Inception feature extractor (e.g. the common
    `inception-2015-12-05.pt` used by StyleGAN2-ADA / clean-fid: uint8 (N, 3, H, W) in, 2048-d features out
    when called with return_features=True). Nothing is downloaded."""
    path = Path(weights_path) if weights_path else None
    if path is None or not path.is_file():
        raise EvalError(f"Inception weights not found at {weights_path}: standard FID needs a TorchScript Inception "
                        f"file you supply (none can be downloaded here); use fid() with the Shapes evaluator instead")
    with warnings.catch_warnings():  # TorchScript is deprecated upstream but remains the format these files use
        warnings.simplefilter("ignore", DeprecationWarning)
        net = torch.jit.load(str(path), map_location="cpu").eval()

    def feature_fn(x):
        try:
            return net(x, return_features=True)
        except (RuntimeError, TypeError):
            return net(x)

    return fid(real, fake, feature_fn, batch_size)


# --- text-image alignment -------------------------------------------------------------------------------


@torch.no_grad()
def alignment_score(images: torch.Tensor, texts: Sequence[str], model, tokenizer=None, batch_size: int = 64) -> float:
    """CLIPScore-style: mean over pairs of max(100 * cos(image_proj(image_embed), text_proj(text_embed)), 0).

    model: a PretrainingModel (or a loaded pretrain run, whose tokenizer is used when none is given)."""
    if hasattr(model, "model") and hasattr(model, "tokenizer"):  # imagen.load(run)
        tokenizer = tokenizer or model.tokenizer
        model = model.model
    if tokenizer is None:
        raise EvalError("alignment_score needs the pretraining run's tokenizer")
    if len(images) != len(texts):
        raise EvalError(f"alignment_score got {len(images)} images but {len(texts)} texts")
    if len(texts) == 0:
        return float("nan")
    model.eval()
    dev = next(model.parameters()).device
    side = model.config.image_size
    scores = []
    for i in range(0, len(texts), batch_size):
        x = normalize_images(images[i:i + batch_size].to(dev))
        if x.shape[-2:] != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=x.shape[-1] > side)
        ids, mask = tokenizer.encode(list(texts[i:i + batch_size]), max_length=model.config.max_text_len)
        img = model.image_proj(model.encoder(images=x).image_embed).float()
        txt = model.text_proj(model.encoder(input_ids=ids.to(dev), attention_mask=mask.to(dev)).text_embed).float()
        scores.append((100 * F.cosine_similarity(img, txt, dim=-1)).clamp(min=0).cpu())
    return float(torch.cat(scores).mean())
