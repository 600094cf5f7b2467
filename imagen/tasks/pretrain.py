"""Self-supervised multimodal pretraining as a task: MLM, MIM, ITC and ITM through PretrainingModel."""

from __future__ import annotations

import torch

from imagen.data.images import normalize_images
from imagen.data.splits import collate_batch


class PretrainTask:
    """Wraps PretrainingModel for the trainer; validation reports each objective and in-batch retrieval."""

    name = "pretrain"
    monitor = ("loss", "min")

    def __init__(self, run_config=None):
        self.run_config = run_config

    def collate(self, batch):
        return collate_batch(batch)

    @staticmethod
    def _inputs(batch):
        return normalize_images(batch["images"]), batch.get("input_ids"), batch.get("attention_mask")

    def training_step(self, model, batch):
        images, input_ids, attention_mask = self._inputs(batch)
        return model(images, input_ids, attention_mask)

    @torch.no_grad()
    def validation_step(self, model, batch):
        images, input_ids, attention_mask = self._inputs(batch)
        out = {k: v.detach().float() for k, v in model(images, input_ids, attention_mask).items()}
        if input_ids is not None and not model.pretrain.image_only and images.shape[0] > 1:
            logits = model.contrastive_logits(images, input_ids, attention_mask)
            same_text = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1)
            hit = same_text[torch.arange(len(logits)), logits.argmax(1)]  # a retrieved duplicate caption counts
            out["itc_r1"] = hit.float().mean()
        return out

    def compute_metrics(self, outputs):
        keys = outputs[0].keys() if outputs else []
        return {k: float(torch.stack([o[k] for o in outputs]).mean()) for k in keys}
