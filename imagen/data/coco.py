"""COCO instances JSON (the detection community's format) read into per-image records."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from imagen.errors import DataError

# Boxes may poke past the image edge by this many pixels (rounding in annotation tools) before they are errors.
BORDER_TOLERANCE = 1.0


def read_coco(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """(image path, metadata) per image of a COCO instances JSON file.

    Metadata: {"id": the COCO image id, "width", "height", "category_ids": {name: id},
    "objects": [{"box": [x0, y0, x1, y1], "label": category name}]}. Image paths are `file_name` under
    `image_root` (default: the JSON file's folder). Crowd annotations (iscrowd = 1) mark regions, not
    objects, and are left out. DataError names the image and annotation of a broken or out-of-image box.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read COCO file {path} ({exc}); give a COCO instances JSON file") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path} is not a COCO instances file: it needs 'images', 'annotations' and 'categories' lists")
    root = Path(image_root) if image_root is not None else path.parent
    names = {}
    for c in data.get("categories") or []:
        if "id" not in c or "name" not in c:
            raise DataError(f"{path}: category {c!r} needs an 'id' and a 'name'")
        names[c["id"]] = str(c["name"])
    category_ids = {n: i for i, n in names.items()}
    images: dict[Any, tuple[Path, dict[str, Any]]] = {}
    for img in data["images"]:
        if not isinstance(img, dict) or "id" not in img or not img.get("file_name"):
            raise DataError(f"{path}: image entry {img!r} needs an 'id' and a 'file_name'")
        meta = {"id": img["id"], "objects": [], "category_ids": category_ids}
        if img.get("width") and img.get("height"):
            meta["width"], meta["height"] = int(img["width"]), int(img["height"])
        images[img["id"]] = (root / str(img["file_name"]), meta)
    for ann in data.get("annotations") or []:
        where = f"{path}: annotation {ann.get('id', '?')} of image {ann.get('image_id', '?')}"
        if ann.get("image_id") not in images:
            raise DataError(f"{where}: no image with that id; add it to 'images' or drop the annotation")
        if ann.get("category_id") not in names:
            raise DataError(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
        if ann.get("iscrowd"):
            continue
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DataError(f"{where}: bbox {bbox!r} must be [x, y, width, height] numbers")
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            raise DataError(f"{where}: bbox {bbox} has zero or negative width/height; fix or drop it")
        meta = images[ann["image_id"]][1]
        W, H = meta.get("width"), meta.get("height")
        tol = BORDER_TOLERANCE
        if x < -tol or y < -tol or (W and x + w > W + tol) or (H and y + h > H + tol):
            raise DataError(f"{where}: bbox {bbox} lies outside the {W}x{H} image; fix it or drop it")
        meta["objects"].append({"box": [x, y, x + w, y + h], "label": names[ann["category_id"]]})
    return list(images.values())
