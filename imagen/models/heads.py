"""Task adapter heads on top of the multimodal encoder, each returning an output whose loss is set only with labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from imagen.config import EncoderConfig
from imagen.models.encoder import MultimodalEncoder


@dataclass
class ClassifierOutput:
    logits: torch.Tensor  # (B, num_classes)
    loss: torch.Tensor | None = None


class ClassificationHead(nn.Module):
    """LayerNorm + dropout + linear layer on a pooled embedding."""

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.fc.weight)  # start from uniform predictions; a fresh head should not fight the encoder
        nn.init.zeros_(self.fc.bias)

    def forward(self, pooled):
        return self.fc(self.drop(self.norm(pooled)))


class EncoderForClassification(nn.Module):
    """The encoder + a linear classification head on the mean patch state (or the [CLS] / text embedding)."""

    def __init__(self, config: EncoderConfig, num_classes: int, label_smoothing: float = 0.0, head_dropout: float = 0.0,
                 pooling: str = "mean"):
        super().__init__()
        self.pooling = pooling
        if num_classes < 2:
            raise ValueError(f"classification needs at least 2 classes, got {num_classes}")
        self.config = config
        self.label_smoothing = label_smoothing
        self.encoder = MultimodalEncoder(config)
        self.head = ClassificationHead(config.dim, num_classes, head_dropout)

    def forward(self, images=None, input_ids=None, attention_mask=None, labels=None) -> ClassifierOutput:
        out = self.encoder(images=images, input_ids=input_ids, attention_mask=attention_mask)
        if self.pooling == "mean" and out.image_states is not None:
            pooled = out.image_states[:, 1:].mean(1)  # (B, dim): average over patches
        else:
            pooled = out.pooled
        logits = self.head(pooled).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return ClassifierOutput(logits=logits, loss=loss)

    def reset_head(self, num_classes: int) -> None:
        """Replace the head (timm's reset_classifier), e.g. to fine-tune on a new label set."""
        self.head = ClassificationHead(self.config.dim, num_classes, self.head.drop.p)


class EncoderForVQA(nn.Module):
    """The encoder's joint [image; question] pass + ViLT's answer classifier on the fused [CLS] states.

    With `grid_dim` > 0 the classifier also reads every fused patch state, each projected to `grid_dim`
    channels and flattened in raster order, so "where" answers come from which patches the question lit up
    rather than from attention pooling, which has to learn to find them first.
    """

    def __init__(self, config: EncoderConfig, num_answers: int, grid_dim: int = 0):
        super().__init__()
        if num_answers < 1:
            raise ValueError("VQA needs at least one answer in its vocabulary")
        self.config = config
        self.encoder = MultimodalEncoder(config)
        d = config.dim
        self.grid = nn.Linear(d, grid_dim) if grid_dim > 0 else None
        width = 2 * d + grid_dim * config.num_patches
        # Image [CLS] and question [CLS] of the fused pass (and the patch grid), concatenated.
        self.head = nn.Sequential(nn.Linear(width, 2 * d), nn.LayerNorm(2 * d), nn.GELU(), nn.Linear(2 * d, num_answers))

    def forward(self, images, input_ids, attention_mask=None) -> torch.Tensor:
        out = self.encoder(images=images, input_ids=input_ids, attention_mask=attention_mask)
        parts = [out.image_embed, out.text_embed]
        if self.grid is not None:
            parts.append(self.grid(out.image_states[:, 1:]).flatten(1))  # (B, num_patches * grid_dim)
        return self.head(torch.cat(parts, dim=-1))  # (B, num_answers) logits
