"""Detection metrics through pycocotools' COCOeval, and COCO-style JSON in and out.

mAP is COCO's: AP averaged over IoU thresholds 0.50:0.05:0.95 and over the classes that have ground truth
(`map`), and AP at IoU 0.5 (`map_50`, the PASCAL VOC figure). Both are computed from in-memory COCO
structures, so the figures are exactly those the official evaluation prints for the same boxes.

Boxes inside imagen are (x0, y0, x1, y1) pixels; COCO files hold (x, y, width, height).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from imagen.errors import DataError


def _xywh(box: Sequence[float]) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def coco_ground_truth(gt: Sequence[Sequence[tuple[Sequence[float], int]]], num_classes: int) -> dict[str, Any]:
    """A COCO instances dict from per-image [(xyxy box, class index), ...]; image ids 1..N, category ids index + 1."""
    images, annotations = [], []
    for i, objects in enumerate(gt, start=1):
        images.append({"id": i})
        for box, label in objects:
            x, y, w, h = _xywh(box)
            # Annotation ids start at 1: COCOeval marks a match by storing the id, so id 0 would read as "unmatched".
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(label) + 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}


def coco_detections(dets: Sequence[Sequence[tuple[Sequence[float], float, int]]]) -> list[dict[str, Any]]:
    """COCO results from per-image [(xyxy box, score, class index), ...], image ids 1..N."""
    return [{"image_id": i, "category_id": int(label) + 1, "bbox": _xywh(box), "score": float(score)}
            for i, image_dets in enumerate(dets, start=1) for box, score, label in image_dets]


def coco_map(gt: Sequence[Sequence[tuple[Sequence[float], int]]],
             dets: Sequence[Sequence[tuple[Sequence[float], float, int]]], num_classes: int) -> dict[str, float]:
    """{"map": AP@[.5:.95], "map_50": AP@.5} of detections against ground truth, one list entry per image.

    NaN when no image has a ground-truth box (nothing to find); 0 when there are boxes but no detections.
    """
    if len(gt) != len(dets):
        raise ValueError(f"{len(gt)} ground-truth images but {len(dets)} detection lists")
    if not any(len(g) for g in gt):
        return {"map": math.nan, "map_50": math.nan}
    results = coco_detections(dets)
    if not results:
        return {"map": 0.0, "map_50": 0.0}
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # COCO prints progress and its summary table
        truth = COCO()
        truth.dataset = coco_ground_truth(gt, num_classes)
        truth.createIndex()
        found = truth.loadRes(results)
        ev = COCOeval(truth, found, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # stats[0], stats[1]: AP at IoU .50:.95 and .50, all areas, 100 detections per image; -1 = undefined.
    return {"map": max(0.0, float(ev.stats[0])), "map_50": max(0.0, float(ev.stats[1]))}


# -- COCO files ------------------------------------------------------------------------------------------


def coco_results(predictions: Sequence[dict[str, Any]], image_ids: Sequence[Any],
                 category_ids: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """COCO results rows from `predict` outputs (each with "detections": [{"label", "score", "box"}]).

    Category ids come from `category_ids` (name -> id, e.g. from `read_coco`'s file) or, without it, from the
    sorted set of predicted labels, numbered from 1.
    """
    if len(predictions) != len(image_ids):
        raise ValueError(f"{len(predictions)} predictions but {len(image_ids)} image ids")
    if category_ids is None:
        names = sorted({d["label"] for p in predictions for d in p["detections"]})
        category_ids = {n: k for k, n in enumerate(names, start=1)}
    rows = []
    for pred, image_id in zip(predictions, image_ids):
        for d in pred["detections"]:
            if d["label"] not in category_ids:
                raise DataError(f"label {d['label']!r} has no COCO category id; add it to the categories")
            rows.append({"image_id": image_id, "category_id": category_ids[d["label"]],
                         "bbox": [round(v, 2) for v in _xywh(d["box"])], "score": round(float(d["score"]), 5)})
    return rows


def write_coco_results(path: str | os.PathLike, predictions: Sequence[dict[str, Any]], image_ids: Sequence[Any],
                       category_ids: dict[str, int] | None = None) -> Path:
    """Write `coco_results(...)` as a COCO results JSON file (the format COCO.loadRes and the servers read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco_results(predictions, image_ids, category_ids)), encoding="utf-8")
    return path
