"""A split held in memory as tensors: uint8 images, pre-tokenised texts and label ids.

Small vision-language datasets fit in RAM many times over; decoding and tokenising once turns every later
batch into a tensor index, which keeps CPU training bound by the model rather than by PIL. `trim_padding` is
the one place a batch's token ids lose the padding all its rows share (every split here uses it).
"""

from __future__ import annotations

import torch


def trim_padding(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cut mask (B, T) and each (B, T, ...) tensor to the longest row's length (at least 1): (mask, *tensors)."""
    length = max(1, int(mask.sum(1).max()))
    return (mask[:, :length], *(t[:, :length] for t in tensors))


class TensorSplit(torch.utils.data.Dataset):
    """Images (N, 3, S, S) uint8, optional input_ids / attention_mask (N, T) and labels (N,)."""

    def __init__(self, images, input_ids=None, attention_mask=None, labels=None, texts=None):
        self.images = images
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.labels = labels
        self.texts = texts

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, indices):
        """A whole batch at once (DataLoader calls this with a batch's indices), already collated."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = {"images": self.images[idx]}
        if self.input_ids is not None:
            batch["attention_mask"], batch["input_ids"] = trim_padding(self.attention_mask[idx], self.input_ids[idx])
        if self.labels is not None:
            batch["labels"] = self.labels[idx]
        return batch


def collate_batch(batch):
    """Collate for TensorSplit: batches arrive already collated from __getitems__."""
    return batch


def build_split(dataset, image_size: int, tokenizer=None, max_text_len: int = 32, class_names=None, use_text=True) -> TensorSplit:
    """Materialise a dataset split as a TensorSplit (images resized to image_size, texts tokenised)."""
    images = dataset.fast_images(image_size)
    input_ids = attention_mask = texts = None
    if use_text and tokenizer is not None and getattr(dataset, "has_text", False):
        texts = [t or "" for t in dataset.texts()]
        input_ids, attention_mask = tokenizer.encode(texts, max_length=max_text_len, pad_to_max=True)
    labels = None
    if class_names is not None:
        index = {name: i for i, name in enumerate(class_names)}
        raw = dataset.labels()
        missing = sorted({str(r) for r in raw if r not in index})
        if missing:
            raise ValueError(f"labels {missing[:5]} are not among the run's classes {class_names[:10]}")
        labels = torch.tensor([index[r] for r in raw], dtype=torch.long)
    return TensorSplit(images, input_ids, attention_mask, labels, texts)
