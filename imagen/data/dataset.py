"""ImageTextDataset: one list-like type for every data source (files, arrays, procedural generators)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import image_to_tensor, open_image, resize_square


class ImageTextDataset(torch.utils.data.Dataset):
    """Samples as dicts with 'image' (PIL RGB), 'text', 'label' and optional 'questions', 'objects', 'id'."""

    def __init__(self, fetch: Callable[[int], dict], length: int, *, name: str, split: str,
                 class_names: list[str] | None = None, image_size: int | None = None,
                 has_text: bool = True, has_labels: bool = False, skipped: Sequence[str] = (),
                 array: np.ndarray | None = None, texts: Sequence[str | None] | None = None,
                 labels: Sequence[str | None] | None = None, resize: int | None = None,
                 captions: Sequence[list[str]] | None = None, caption_fn: Callable[[int], list[str]] | None = None):
        self._fetch = fetch  # base index -> sample dict (image may be PIL or path-opened lazily)
        self._index = np.arange(length, dtype=np.int64)
        self._array = array  # optional uint8 (N,H,W) or (N,H,W,3) holding every base image, for fast_images
        self._texts, self._labels = texts, labels  # optional per-base-index metadata, avoids decoding images
        self._captions = captions  # optional per-base-index caption lists (several rows about one image)
        self._caption_fn = caption_fn  # optional base index -> caption list, for sources that word them on demand
        self._resize = resize
        self.name, self.split = name, split
        self.class_names = list(class_names) if class_names is not None else None
        self.image_size = resize or image_size
        self.has_text, self.has_labels = has_text, has_labels
        self.skipped = list(skipped)

    # -- constructors -----------------------------------------------------------------------------------

    @classmethod
    def from_records(cls, records: list[dict], **kw: Any) -> "ImageTextDataset":
        """Path-backed: each record has 'path' plus text/label/...; images are opened lazily on access."""
        return cls(_RecordFetch(records), len(records), texts=[r.get("text") for r in records],
                   labels=[r.get("label") for r in records],
                   captions=[_caption_list(r) for r in records], **kw)

    @classmethod
    def from_array(cls, images: np.ndarray, texts: Sequence[str | None], labels: Sequence[str | None],
                   ids: Sequence[str] | None = None, **kw: Any) -> "ImageTextDataset":
        """In-memory: uint8 images (N,H,W) grey or (N,H,W,3) RGB with per-image text and label."""
        kw.setdefault("image_size", int(images.shape[1]))
        return cls(_ArrayFetch(images, texts, labels, ids), len(images), array=images, texts=texts,
                   labels=labels, **kw)

    @classmethod
    def from_function(cls, fn: Callable[[int], dict], length: int, **kw: Any) -> "ImageTextDataset":
        """Procedural: fn(index) returns a full sample dict (rendered on the fly)."""
        return cls(fn, length, **kw)

    # -- list protocol --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {self.name}/{self.split} of {len(self)} samples")
        sample = dict(self._fetch(int(self._index[i])))
        sample.setdefault("text", None)
        sample.setdefault("label", None)
        if self._resize is not None:
            sample["image"] = resize_square(sample["image"], self._resize)
        return sample

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        classes = f", {len(self.class_names)} classes" if self.class_names else ""
        return f"ImageTextDataset({self.name!r}, split={self.split!r}, n={len(self)}, size={self.image_size}{classes})"

    # -- bulk access ----------------------------------------------------------------------------------

    def subset(self, indices: Sequence[int]) -> "ImageTextDataset":
        """A view holding only the given positions (shares storage with this dataset)."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._index = self._index[np.asarray(indices, dtype=np.int64)]
        view.skipped = list(self.skipped)
        return view

    def texts(self) -> list[str | None]:
        """All captions in order, without decoding images when the source knows them."""
        if self._texts is not None:
            return [self._texts[i] for i in self._index]
        return [self._fetch(int(i)).get("text") for i in self._index]

    def caption_sets(self) -> list[list[str]]:
        """Every caption of each sample, first caption first: its 'captions' (rows of one image), the source's
        caption_fn (Shapes: the caption and its paraphrases), or its 'text'. [] where a sample has none."""
        if self._captions is not None:
            return [list(self._captions[i]) for i in self._index]
        if self._caption_fn is not None:
            return [self._caption_fn(int(i)) for i in self._index]
        if self._texts is not None:
            return [[t] if t else [] for t in self.texts()]
        return [_caption_list(self._fetch(int(i))) for i in self._index]

    def labels(self) -> list[str | None]:
        """All labels in order, without decoding images when the source knows them."""
        if self._labels is not None:
            return [self._labels[i] for i in self._index]
        return [self._fetch(int(i)).get("label") for i in self._index]

    def label_ids(self) -> torch.Tensor:
        """Labels as class indices into class_names (LongTensor (N,)); -1 where a sample has no label."""
        lookup = {c: k for k, c in enumerate(self.class_names or [])}
        return torch.tensor([lookup.get(lab, -1) for lab in self.labels()], dtype=torch.long)

    def fast_images(self, size: int | None = None) -> torch.Tensor:
        """Every image as a uint8 tensor (N, 3, size, size); vectorised for array-backed data."""
        size = int(size or self.image_size)
        if self._array is not None:
            return _array_to_tensor(self._array[self._index], size)
        out = torch.empty((len(self), 3, size, size), dtype=torch.uint8)
        for k in range(len(self)):
            out[k] = image_to_tensor(self[k]["image"], size)
        return out


def _caption_list(sample: dict) -> list[str]:
    # Repeats are kept: a uniform draw then follows the captions' own frequencies.
    return [str(t) for t in (sample.get("captions") or [sample.get("text")]) if t]


# Fetchers are module-level classes, not closures, so datasets pickle into spawned DataLoader workers.

class _RecordFetch:
    def __init__(self, records: list[dict]):
        self.records = records

    def __call__(self, i: int) -> dict:
        rec = self.records[i]
        out = {k: v for k, v in rec.items() if k != "path"}
        out["image"] = open_image(rec["path"])
        out.setdefault("id", str(rec["path"]))
        return out


class _ArrayFetch:
    def __init__(self, images: np.ndarray, texts, labels, ids):
        self.images, self.texts, self.labels, self.ids = images, texts, labels, ids

    def __call__(self, i: int) -> dict:
        arr = self.images[i]
        img = Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB").convert("RGB")
        return {"image": img, "text": self.texts[i], "label": self.labels[i],
                "id": self.ids[i] if self.ids is not None else str(i)}


def _array_to_tensor(arr: np.ndarray, size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 (N,H,W[,3]) -> uint8 (N,3,size,size), centre-cropped and resized in chunks to bound memory."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    n, c, h, w = t.shape
    if h != w:  # centre-crop to a square first, like image_to_tensor does after its resize
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        t = t[:, :, top:top + s, left:left + s]
    if t.shape[-1] != size:
        parts = []
        for k in range(0, n, chunk):
            x = t[k:k + chunk].float()
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            parts.append(x.round_().clamp_(0, 255).to(torch.uint8))
        t = torch.cat(parts) if parts else torch.empty((0, c, size, size), dtype=torch.uint8)
    return t.expand(-1, 3, -1, -1).contiguous() if c == 1 else t.contiguous()
