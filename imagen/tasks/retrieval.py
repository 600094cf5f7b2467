"""Image-text retrieval and zero-shot classification: a dual encoder trained with the contrastive (ITC) loss.

The CLIP recipe (Radford et al. 2021) on the shared multimodal encoder: separate image and text passes, linear
projections to a joint space, cosine similarity scaled by a learned temperature, and the symmetric InfoNCE loss
over a batch of image-caption pairs. Captions repeated within a batch are positives for each other (soft targets),
as in pretraining. Starting from a pretraining run loads its ITC heads too, so the model can retrieve before any
fine-tuning; `--freeze encoder` trains only the projections and the temperature (a linear probe of the encoder).

Metrics over the whole split (eval/retrieval.py): recall@1/5/10 image->text (`r@k`) and text->image
(`t2i_r@k`), their mean `r_mean`; on Shapes also `facts_r@k` / `facts_t2i_r@k`, where a caption naming exactly
the image's objects counts as a hit; and, where the split has class labels, `zero_shot_accuracy`: class names
written into prompt templates ("a {label}", ...) classify the images with no classifier training.

Shapes captions choose a filler prefix ("there is", "an image of"), optional size and position words and an
object order at random, so several distinct captions describe one image equally well: a model that knew every
object exactly would still reach only r@1 0.660 image->text (0.695 text->image) on the 1,000 test pairs under
the exact-caption rule (bench/retrieval_ceiling.py). Figures of the recipe: bench/RESULTS.md.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from imagen.config import ConfigError, EncoderConfig
from imagen.data.images import normalize_images
from imagen.errors import DataError
from imagen.data.examples import ExampleSplit
from imagen.eval.retrieval import (caption_relevance, class_embeddings, contrastive_loss, fact_recall, retrieval_metrics,
                                   zero_shot_accuracy)
from imagen.models.encoder import MultimodalEncoder
from imagen.tasks.caption import english_shapes
from imagen.tasks.base import Task, require_tokenizer

log = logging.getLogger("imagen")

# Shapes label kinds that name the largest object: a whole-image class only when the image holds one object.
OBJECT_LABEL_KINDS = ("shape", "color", "color-shape")
# The contrastive heads, named as in PretrainingModel so a pretraining run's weights load by name.
HEAD_KEYS = ("image_proj.weight", "image_proj.bias", "text_proj.weight", "text_proj.bias", "logit_scale")


@dataclass
class RetrievalConfig:
    # Zero-shot prompts; "{label}" is replaced by each class name and a class's prompt embeddings are averaged.
    # From the command line: --set 'retrieval.templates=a photo of a {label},a {label}' (comma-separated).
    templates: tuple[str, ...] = ("a {label}", "an image of a {label}", "a picture with a {label}")
    # Class labels for zero-shot accuracy: a Shapes label kind (labels[kind], single-object images only for the
    # object kinds shape / color / color-shape), else each sample's 'label'; "none" turns zero-shot off. The
    # classes are those seen in training; evaluation images of other classes are left out of the accuracy.
    zero_shot_label: str = "color-shape"
    zero_shot_min_samples: int = 20  # fewer labelled images in a split than this: no zero_shot_accuracy
    # Softmax temperature before training; a pretraining run's learned temperature replaces it under --init-from.
    temperature_init: float = 0.07
    proj_dim: int = 128  # joint embedding width (PretrainingModel's is 128; another width loads the encoder only)

    def __post_init__(self):
        if isinstance(self.templates, str):
            self.templates = (self.templates,)
        self.templates = tuple(str(t) for t in self.templates)
        if not self.templates:
            raise ConfigError("retrieval.templates is empty; give at least one prompt such as \"a photo of a {label}\"")
        for t in self.templates:
            if "{label}" not in t:
                raise ConfigError(f"retrieval.templates entry {t!r} has no {{label}} placeholder, e.g. \"a photo of a {{label}}\"")
        if not self.zero_shot_label:
            raise ConfigError("retrieval.zero_shot_label is empty; name a label kind (e.g. color-shape) or none")
        if self.zero_shot_min_samples < 1:
            raise ConfigError(f"retrieval.zero_shot_min_samples must be at least 1, got {self.zero_shot_min_samples}")
        if not 0.0 < self.temperature_init <= 1.0:
            raise ConfigError(f"retrieval.temperature_init must be in (0, 1], got {self.temperature_init}")
        if self.proj_dim < 1:
            raise ConfigError(f"retrieval.proj_dim must be positive, got {self.proj_dim}")


class RetrievalModel(nn.Module):
    """The multimodal encoder as a dual encoder: unimodal passes, projections, normalised embeddings."""

    def __init__(self, config: EncoderConfig, proj_dim: int = 128, temperature: float = 0.07):
        super().__init__()
        self.config = config
        self.encoder = MultimodalEncoder(config)
        self.image_proj = nn.Linear(config.dim, proj_dim)
        self.text_proj = nn.Linear(config.dim, proj_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, proj_dim) unit vectors."""
        return F.normalize(self.image_proj(self.encoder(images=images).image_embed).float(), dim=-1)

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, proj_dim) unit vectors."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(self.text_proj(out.text_embed).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        """1 / temperature, capped at 100 as in CLIP."""
        return self.logit_scale.exp().clamp(max=100.0)

    def forward(self, images, input_ids, attention_mask) -> torch.Tensor:
        """(B, B) image-to-text logits: scaled cosine similarities."""
        return self.scale() * self.embed_images(images) @ self.embed_texts(input_ids, attention_mask).t()


def zero_shot_label(meta: dict, kind: str) -> str | None:
    """A sample's whole-image class for zero-shot evaluation, or None (see RetrievalConfig.zero_shot_label)."""
    if kind == "none":
        return None
    labels = meta.get("labels")
    if isinstance(labels, dict) and labels.get(kind) is not None:
        objects = meta.get("objects")
        if kind in OBJECT_LABEL_KINDS and isinstance(objects, list) and len(objects) != 1:
            return None  # "the largest object is a red circle" does not describe a picture of three things
        return str(labels[kind])
    label = meta.get("label")
    return None if label is None or str(label) == "" else str(label)


def captions_of(meta: list[dict]) -> list[tuple[int, str]]:
    """(image index, caption) of every sample with a non-empty caption."""
    return [(k, str(m["text"]).strip()) for k, m in enumerate(meta) if str(m.get("text") or "").strip()]


class RetrievalTask(Task):
    name = "retrieval"
    monitor = ("r_mean", "max")
    Config = RetrievalConfig
    headline = ("r@1", "t2i_r@1", "facts_r@1", "zero_shot_accuracy")
    predict_inputs = ("texts",)
    # From a 5-epoch pretraining run, 16,000 Shapes pairs x 15 epochs reach test r@1 0.420 / facts_r@1 0.841;
    # 4,000 x 60 epochs (the same steps) 0.369 / 0.792. A batch of 128 at lr 2e-3 did worse on validation.
    recipe = {"epochs": 15, "shapes_n": 16000}

    def __init__(self, run_config, tokenizer=None):
        super().__init__(run_config, tokenizer)
        self._prompts = None  # (ids, mask) of every class x template prompt, encoded on first use

    # -- vocabulary, data and model ------------------------------------------------------------------

    @classmethod
    def vocabulary(cls, meta, cfg, dataset=None):
        """The zero-shot class names seen in training (sorted), or None when the data has fewer than two."""
        names = sorted({label for m in meta if (label := zero_shot_label(m, cfg.zero_shot_label)) is not None})
        return names if len(names) >= 2 else None

    @classmethod
    def tokenizer_texts(cls, meta, cfg):
        prompts = [fill(t, c) for c in cls.vocabulary(meta, cfg) or [] for t in cfg.templates]
        return [c for _, c in captions_of(meta)] + prompts

    @classmethod
    def build_model(cls, rc, tokenizer):
        cfg = cls.config_from(rc.task_config)
        return RetrievalModel(rc.model, proj_dim=cfg.proj_dim, temperature=cfg.temperature_init)

    def init_from(self, model, init) -> str:
        """The encoder, plus the ITC projections and temperature when the run has them (pretrain / retrieval)."""
        model.encoder.load_encoder_weights(init.model.encoder.state_dict())
        source, target = init.model.state_dict(), model.state_dict()
        heads = [k for k in HEAD_KEYS if k in source and source[k].shape == target[k].shape]
        if len(heads) != len(HEAD_KEYS):
            why = "has no contrastive heads" if not heads else "has contrastive heads of another width"
            log.info("the %s run %s; its encoder only is loaded", init.task, why)
            return "encoder"
        model.load_state_dict({k: source[k] for k in heads}, strict=False)
        return "encoder, image/text projections and temperature"

    def build_split(self, images, meta, train):
        tok = require_tokenizer(self.tokenizer, self.name)
        rows = captions_of(meta)
        if not rows:
            raise DataError("no captions in this split; retrieval needs images with a 'text' (or 'caption') field")
        captions = [c for _, c in rows]
        ids, mask = tok.encode(captions, max_length=self.rc.model.max_text_len, pad_to_max=True)
        key: dict[str, int] = {}
        index = {c: i for i, c in enumerate(self.rc.class_names or [])}
        labels = [zero_shot_label(meta[k], self.cfg.zero_shot_label) for k, _ in rows]
        fields = {
            "caption_ids": ids, "caption_mask": mask,
            "caption_key": torch.tensor([key.setdefault(c, len(key)) for c in captions]),  # equal = same caption text
            "caption": captions,
            "objects": [meta[k].get("objects") for k, _ in rows],
            "zs_label": torch.tensor([index.get(lab, -1) if lab is not None else -1 for lab in labels]),
        }
        return ExampleSplit(images, torch.tensor([k for k, _ in rows]), fields)

    # -- training and evaluation -----------------------------------------------------------------------

    def training_step(self, model, batch):
        logits = model(normalize_images(batch["images"]), batch["caption_ids"], batch["caption_mask"]).float()
        same = batch["caption_key"][:, None] == batch["caption_key"][None, :]
        hit = same[torch.arange(len(logits), device=logits.device), logits.argmax(1)].float().mean()
        return {"loss": contrastive_loss(logits, same), "acc": hit.detach(), "logit_scale": model.scale().detach()}

    def _class_embeds(self, model) -> torch.Tensor:
        """(classes, proj_dim) zero-shot class embeddings: each class's template prompts, averaged."""
        names = self.rc.class_names
        if self._prompts is None:
            tok = require_tokenizer(self.tokenizer, self.name)
            texts = [fill(t, c) for c in names for t in self.cfg.templates]
            self._prompts = tok.encode(texts, max_length=self.rc.model.max_text_len)
        device = next(model.parameters()).device
        ids, mask = (t.to(device) for t in self._prompts)
        return class_embeddings(model.embed_texts(ids, mask).reshape(len(names), len(self.cfg.templates), -1))

    @torch.no_grad()
    def validation_step(self, model, batch):
        out = {"image_embed": model.embed_images(normalize_images(batch["images"])),
               "text_embed": model.embed_texts(batch["caption_ids"], batch["caption_mask"]),
               "caption": batch["caption"], "objects": batch["objects"], "zs_label": batch["zs_label"], "scale": model.scale().detach().reshape(1)}
        if self.rc.class_names and bool((batch["zs_label"] >= 0).any()):
            out["class_embed"] = self._class_embeds(model)  # the same in every batch: the model does not change
        return out

    def compute_metrics(self, outputs):
        """Retrieval over the whole split (N x N similarities), its contrastive loss, and zero-shot accuracy."""
        images = torch.cat([o["image_embed"] for o in outputs]).float()
        texts = torch.cat([o["text_embed"] for o in outputs]).float()
        captions = [c for o in outputs for c in o["caption"]]
        metrics = retrieval_metrics(images, texts, captions)
        objects = [x for o in outputs for x in o["objects"]]
        if english_shapes(objects, captions):
            metrics.update(fact_recall(images, texts, captions, objects))
        scale = float(outputs[-1]["scale"][0])
        metrics["loss"] = float(contrastive_loss(scale * images @ texts.t(), caption_relevance(captions)))
        labels = torch.cat([o["zs_label"] for o in outputs])
        class_embed = next((o["class_embed"] for o in reversed(outputs) if "class_embed" in o), None)
        if class_embed is not None and int((labels >= 0).sum()) >= self.cfg.zero_shot_min_samples:
            metrics["zero_shot_accuracy"] = zero_shot_accuracy(images, class_embed.float(), labels)
        return metrics

    # -- prediction -------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, model, images, files, texts=None, top_k=1, **_):
        """Rank candidate texts for each image; without texts, classify zero-shot over the run's class names."""
        model.eval()
        if texts is not None:
            candidates = [str(t).strip() for t in ([texts] if isinstance(texts, str) else texts)]
            if not candidates:
                raise DataError("no candidate texts to rank; pass some, e.g. --texts \"a red circle\" \"a blue square\"")
            if not all(candidates):
                raise DataError("a candidate text is empty; give every --texts entry some words")
            ids, mask = self.encode_texts(candidates, "candidate text", pad_to_max=False)
            text_embeds, kind = model.embed_texts(ids, mask), "text"
        else:
            if not self.rc.class_names:
                raise DataError("this run has no zero-shot labels (its training data had none); "
                                "pass candidate texts, e.g. --texts \"a red circle\" \"a blue square\"")
            candidates, text_embeds, kind = list(self.rc.class_names), self._class_embeds(model), "label"
        sims = model.embed_images(normalize_images(images)) @ text_embeds.float().t()
        probs = (model.scale() * sims).softmax(-1)  # over the candidates, as CLIP's zero-shot classifier
        out = []
        for f, p, s in zip(files, probs, sims):
            top = p.topk(min(top_k, len(p)))
            ranked = [{kind: candidates[int(i)], "score": float(v), "similarity": float(s[i])}
                      for v, i in zip(top.values, top.indices)]
            out.append({"file": f, kind: ranked[0][kind], "score": ranked[0]["score"],
                        "similarity": ranked[0]["similarity"], "top": ranked,
                        "summary": "\t".join(f"{r[kind]} ({r['score']:.3f})" for r in ranked)})
        return out


def fill(template: str, label: str) -> str:
    """A prompt: the template with its {label} placeholder replaced (other braces are left alone)."""
    return template.replace("{label}", label)
