"""Task examples over a shared image table: many (question, answer) or (instruction, response) rows per image.

`collect` decodes a split once into uint8 images plus each sample's metadata (questions, objects, text);
tasks turn that metadata into example rows and `ExampleSplit` serves batches of them. A VQA split of 4,000
Shapes images holds ~25,000 questions but stores every image once.
"""

from __future__ import annotations

from typing import Any

import torch

from .images import image_to_tensor
from .splits import trim_padding


def collect(dataset, size: int) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Every image of a dataset as uint8 (N, 3, size, size), and every sample's fields except the image.

    Each sample's metadata keeps its image's original "width" and "height", so pixel annotations (boxes) can
    follow the image through the resize and centre crop.
    """
    images = torch.empty((len(dataset), 3, size, size), dtype=torch.uint8)
    meta = []
    for k in range(len(dataset)):
        sample = dataset[k]
        image = sample.pop("image")
        sample.setdefault("width", image.width)
        sample.setdefault("height", image.height)
        images[k] = image_to_tensor(image, size)
        meta.append(sample)
    return images, meta


class ExampleSplit(torch.utils.data.Dataset):
    """Example rows that point into an image table; batches come out already collated.

    `fields` maps a name to a per-example tensor (first dimension = number of examples) or list. Names that
    end in `_ids` are token ids whose padding is trimmed per batch, together with their `_mask` partner.
    """

    def __init__(self, images: torch.Tensor, image_index: torch.Tensor, fields: dict[str, Any] | None = None):
        self.images = images
        self.image_index = torch.as_tensor(image_index, dtype=torch.long)
        self.fields = dict(fields or {})
        for name, value in self.fields.items():
            if len(value) != len(self.image_index):
                raise ValueError(f"field {name!r} has {len(value)} rows for {len(self.image_index)} examples")

    def __len__(self):
        return len(self.image_index)

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch: dict[str, Any] = {"images": self.images[self.image_index[idx]], "image_index": self.image_index[idx]}
        for name, value in self.fields.items():
            if isinstance(value, torch.Tensor):
                batch[name] = value[idx]
            else:
                batch[name] = [value[i] for i in idx.tolist()]
        for name in [n for n in batch if n.endswith("_ids") and f"{n[:-4]}_mask" in batch]:
            batch[f"{name[:-4]}_mask"], batch[name] = trim_padding(batch[f"{name[:-4]}_mask"], batch[name])
        return batch
