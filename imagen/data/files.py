"""User data on disk: ImageFolder trees, annotations.jsonl folders, .jsonl / .csv files and COCO .json files."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .coco import read_coco
from .dataset import ImageTextDataset
from imagen.errors import DataError
from .images import is_image_path, open_image

log = logging.getLogger("imagen.data")

SPLITS = ("train", "val", "test")
IMAGE_KEYS = ("image", "image_path", "file", "path", "filename")
TEXT_KEYS = ("text", "caption")
ANNOTATION_NAMES = ("annotations.jsonl", "annotations.csv")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


class _Bad(Exception):
    """A single unusable sample (reported or skipped according to on_bad_sample)."""


# -- reading annotation rows ------------------------------------------------------------------------

def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs from a .jsonl or .csv file; DataError on a structurally broken file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read annotation file {path} ({exc}); check it is UTF-8 text") from None
    rows: list[tuple[int, dict]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise DataError(f"CSV file {path} has no header row; add one naming the columns (e.g. image,text,label)")
        for row in reader:
            rows.append((reader.line_num, {k.strip(): v for k, v in row.items() if k and v not in (None, "")}))
        return rows
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: invalid JSON ({exc.msg}); fix or delete line {n}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}; fix line {n}")
        rows.append((n, row))
    return rows


def _maybe_json(value):
    """CSV cells hold strings; decode ones that look like JSON lists/objects (boxes, answers)."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _row_to_record(row: dict, where: str, base: Path, label_key: str) -> dict:
    """Normalise one annotation row into a record; _Bad if it names no image."""
    key = next((k for k in IMAGE_KEYS if row.get(k)), None)
    if key is None:
        raise _Bad(f"{where} (no image path; expected one of {', '.join(IMAGE_KEYS)})")
    path = Path(str(row[key]))
    rec: dict = {"path": path if path.is_absolute() else base / path}
    rec["id"] = str(row.get("id", row[key]))
    rec["text"] = next((str(row[k]) for k in TEXT_KEYS if row.get(k) not in (None, "")), None)
    if rec["text"] is not None:
        rec["captions"] = [rec["text"]]
    label = row.get(label_key)
    rec["label"] = None if label is None else str(label)
    if isinstance(row.get("labels"), dict):
        rec["labels"] = {str(k): str(v) for k, v in row["labels"].items()}
    questions = _maybe_json(row.get("questions"))
    if isinstance(questions, list):
        rec["questions"] = questions
    elif row.get("question"):
        answers = _maybe_json(row.get("answers", row.get("answer")))
        answers = answers if isinstance(answers, list) else ([] if answers is None else [answers])
        # VQAv2 lists annotator answers as {"answer": ..., "answer_confidence": ...} objects.
        answers = [str(a["answer"]) if isinstance(a, dict) and "answer" in a else str(a) for a in answers]
        rec["questions"] = [{"question": str(row["question"]), "answer": answers[0] if answers else None,
                             "answers": answers}]
    if row.get("instruction") is not None or row.get("response") is not None:  # instruction-tuning rows
        rec["instructions"] = [{"instruction": row.get("instruction"), "response": row.get("response"),
                                "task": row.get("task")}]
    objects = _maybe_json(row.get("objects", row.get("boxes")))
    if isinstance(objects, list):
        rec["objects"] = [o if isinstance(o, dict) else {"box": list(o)} for o in objects]
    return rec


def _merge(into: dict, rec: dict) -> None:
    """Fold another row about the same image into its record: questions, captions and instructions add up."""
    for key in ("questions", "captions", "instructions"):
        if rec.get(key):
            into[key] = into.get(key, []) + rec[key]
    for key in ("text", "label", "labels", "objects"):
        if into.get(key) is None and rec.get(key) is not None:
            into[key] = rec[key]


def _rows_source(path: Path, label_key: str, bad: list[str]) -> list[dict]:
    """One record per image of an annotation file; rows without an image are collected in `bad`.

    Rows naming the same image (one question, caption or instruction per row, as VQA and COCO-style files
    have it) become one record, so an image never lands in two splits and is decoded once.
    """
    records: dict[Path, dict] = {}
    label_line: dict[Path, int] = {}
    for n, row in _read_rows(path):
        try:
            rec = _row_to_record(row, f"{path}:{n}", path.parent, label_key)
        except _Bad as exc:
            bad.append(str(exc))
            continue
        first = records.get(rec["path"])
        if first is not None and None not in (first.get("label"), rec["label"]) and first["label"] != rec["label"]:
            bad.append(f"{path}:{n} (image {rec['path'].name} is labelled {first['label']!r} on line "
                       f"{label_line[rec['path']]} but {rec['label']!r} here; kept the first, give one label per image)")
            continue
        if rec["label"] is not None:
            label_line.setdefault(rec["path"], n)
        if first is not None:
            _merge(first, rec)
        else:
            records[rec["path"]] = rec
    return list(records.values())


def _folder_source(root: Path) -> list[dict]:
    """Records from an ImageFolder (class sub-folders) or a flat folder of images (no labels)."""
    def images_under(d: Path, recursive: bool) -> list[Path]:
        it = d.rglob("*") if recursive else d.iterdir()
        return sorted(p for p in it if p.is_file() and not p.name.startswith(".") and is_image_path(p))

    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    records = [{"path": p, "id": str(p.relative_to(root)), "text": None, "label": d.name}
               for d in classes for p in images_under(d, recursive=True)]
    if not records:  # no class folders: treat loose images as an unlabelled set
        records = [{"path": p, "id": p.name, "text": None, "label": None} for p in images_under(root, False)]
    return records


def _is_coco(path: Path) -> bool:
    """A .json file holding one object with an 'images' list is COCO; anything else is read as JSON lines."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get("images"), list)


def _coco_source(path: Path) -> list[dict]:
    """Records from a COCO instances file: boxes as objects with category names, plus the image size."""
    return [{"path": p, "id": str(meta["id"]), "text": None, "label": None, "objects": meta["objects"],
             **{k: meta[k] for k in ("width", "height") if k in meta}} for p, meta in read_coco(path)]


def _source(path: Path, label_key: str, bad: list[str]) -> list[dict]:
    """Records from one split source: an annotation file, a folder with annotations, or an ImageFolder."""
    if path.is_file():
        if path.suffix.lower() not in (".jsonl", ".csv", ".json"):
            raise DataError(f"{path} is not a .jsonl, .csv or COCO .json annotation file; pass a folder or an annotation file")
        if path.suffix.lower() == ".json" and _is_coco(path):
            return _coco_source(path)
        return _rows_source(path, label_key, bad)
    for name in ANNOTATION_NAMES:
        if (path / name).is_file():
            return _rows_source(path / name, label_key, bad)
    return _folder_source(path)


# -- splitting --------------------------------------------------------------------------------------

def split_indices(n: int, seed: int, fractions=DEFAULT_FRACTIONS) -> dict[str, np.ndarray]:
    """Deterministic, disjoint train/val/test index sets covering range(n)."""
    perm = np.random.default_rng(seed).permutation(n)
    # Tiny sets still get one val and one test sample, so every split can be evaluated.
    n_val = max(1, round(fractions[1] * n)) if n >= 3 else 0
    n_test = max(1, round(fractions[2] * n)) if n >= 3 else 0
    return {"val": np.sort(perm[:n_val]), "test": np.sort(perm[n_val:n_val + n_test]),
            "train": np.sort(perm[n_val + n_test:])}


def _split_sources(root: Path) -> dict[str, Path]:
    """Pre-made split folders/files under root (train/, val/, test/ or train.jsonl, ...), if any."""
    found = {}
    if root.is_dir():
        for s in SPLITS:
            for cand in (root / s, root / f"{s}.jsonl", root / f"{s}.csv", root / f"{s}.json"):
                if cand.exists():
                    found[s] = cand
                    break
    return found


def _all_records(root: Path, split: str, seed: int, label_key: str, bad: list[str]) -> tuple[list[dict], list[dict]]:
    """(records of the requested split, records of every split) for a user path."""
    made = _split_sources(root)
    if "train" in made:
        per = {s: _source(p, label_key, bad) for s, p in made.items()}
        train = per["train"]
        missing = [s for s in ("val", "test") if s not in per]
        if missing:  # carve absent val/test out of train so every split exists
            idx = split_indices(len(train), seed)
            for s in missing:
                per[s] = [train[i] for i in idx[s]]
            keep = set(range(len(train))) - {int(i) for s in missing for i in idx[s]}
            per["train"] = [train[i] for i in sorted(keep)]
        everything = [r for s in SPLITS for r in per[s]]
        return per[split], everything
    records = _source(root, label_key, bad)
    idx = split_indices(len(records), seed)
    return [records[i] for i in idx[split]], records


# -- public entry point -----------------------------------------------------------------------------

def load_files(spec: str, split: str = "train", *, seed: int = 0, label: str | None = None,
               n: int | None = None, size: int | None = None, on_bad_sample: str = "skip") -> ImageTextDataset:
    """Load user data from a folder or annotation file as an ImageTextDataset for one split."""
    if on_bad_sample not in ("skip", "error"):
        raise DataError(f"on_bad_sample must be 'skip' or 'error', got {on_bad_sample!r}")
    root = Path(spec).expanduser()
    if not root.exists():
        raise DataError(f"data path not found: {root}; pass a built-in name (shapes, fashion-mnist, emoji), "
                        "a folder, or a .jsonl/.csv file")
    if not root.is_dir() and not root.is_file():
        raise DataError(f"data path {root} is neither a folder nor a regular file (a device, pipe or socket?); "
                        "pass a folder or a .jsonl/.csv/.json file")
    label_key = label or "label"
    bad: list[str] = []
    records, everything = _all_records(root, split, seed, label_key, bad)
    for rec in everything:  # Shapes-style rows: pick the requested label kind out of their 'labels' dict
        if rec.get("label") is None and "labels" in rec and label:
            rec["label"] = rec["labels"].get(label)
    if label and not any(r.get("label") is not None for r in everything):
        raise DataError(f"no rows in {root} have a {label!r} field; pass a label field the data has")
    if not everything and not bad:
        raise DataError(f"no images found in {root}; expected class sub-folders of images, "
                        "an annotations.jsonl, or a .jsonl/.csv file")
    if n is not None:
        records = records[:n]
    reasons: dict[str, str] = {}
    records, sizes = _validate(records, bad, on_bad_sample, reasons)
    if bad:
        log.warning("skipped %d bad sample(s) in %s, e.g. %s", len(bad), root, "; ".join(reasons.get(b, b) for b in bad[:3]))
    if not records:
        raise DataError(f"no usable {split} samples in {root} ({len(bad)} bad); check the files listed above")
    labels = sorted({r["label"] for r in everything if r.get("label") is not None})
    return ImageTextDataset.from_records(
        records, name=str(root), split=split, class_names=labels or None,
        image_size=Counter(sizes).most_common(1)[0][0], has_text=any(r.get("text") for r in records),
        has_labels=bool(labels), skipped=bad, resize=size)


def _check(rec: dict) -> tuple[int | None, str | None]:
    """(shorter side, None) for a decodable image, else (None, the DataError message)."""
    try:
        return min(open_image(rec["path"]).size), None
    except DataError as exc:
        return None, str(exc)


def _validate(records: list[dict], bad: list[str], on_bad_sample: str, reasons: dict[str, str]) -> tuple[list[dict], list[int]]:
    """Decode every image now so broken files surface before training; returns good records and their sizes."""
    if bad and on_bad_sample == "error":
        raise DataError(f"bad sample: {bad[0]}; fix it or pass on_bad_sample='skip'")
    # Threads overlap file I/O and zlib/JPEG decoding, which release the GIL.
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_check, records, chunksize=64))
    good, sizes = [], []
    for rec, (size, error) in zip(records, results):
        if error is None:
            good.append(rec)
            sizes.append(size)
        elif on_bad_sample == "error":
            raise DataError(f"{error} (or pass on_bad_sample='skip' to drop bad samples)")
        else:
            bad.append(str(rec["path"]))
            reasons[str(rec["path"])] = error  # the warning says why
    return good, sizes
