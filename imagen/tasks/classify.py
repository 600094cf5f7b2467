"""Image classification: a linear head on the pooled embedding, cross-entropy, accuracy and macro-F1."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import f1_score

from imagen.data.augment import augment
from imagen.data.images import normalize_images
from imagen.data.splits import collate_batch


class ClassifyTask:
    """Trains EncoderForClassification; metrics are accuracy and macro-F1 (scikit-learn)."""

    name = "classify"
    monitor = ("accuracy", "max")

    def __init__(self, run_config=None):
        classify = getattr(run_config, "classify", None)
        self.augment = classify.augment if classify is not None else "none"

    def collate(self, batch):
        return collate_batch(batch)

    def training_step(self, model, batch):
        images = augment(batch["images"], self.augment)
        out = model(images=normalize_images(images), labels=batch["labels"])
        acc = (out.logits.argmax(-1) == batch["labels"]).float().mean()
        return {"loss": out.loss, "acc": acc.detach()}

    @torch.no_grad()
    def validation_step(self, model, batch):
        out = model(images=normalize_images(batch["images"]), labels=batch["labels"])
        return {"loss": out.loss.detach().float().expand(len(batch["labels"])), "probs": out.logits.float().softmax(-1), "targets": batch["labels"]}

    def compute_metrics(self, outputs):
        probs = torch.cat([o["probs"] for o in outputs]).cpu().numpy()
        targets = torch.cat([o["targets"] for o in outputs]).cpu().numpy()
        preds = probs.argmax(1)
        return {
            "loss": float(torch.cat([o["loss"] for o in outputs]).mean()),
            "accuracy": float((preds == targets).mean()),
            "macro_f1": float(f1_score(targets, preds, average="macro", labels=np.arange(probs.shape[1]), zero_division=0)),
        }
