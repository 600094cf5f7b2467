"""What every text-generating task shares: prompt and target encoding, the encoder-decoder, teacher-forced
training and decoding for validation and prediction. Captioning, instruction following and generative VQA
differ only in which rows they build and how they score the generated text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from imagen.config import ConfigError
from imagen.data.images import normalize_images
from imagen.data.examples import ExampleSplit
from imagen.models.decoder import EncoderDecoder
from imagen.tasks.base import Task, require_tokenizer

log = logging.getLogger("imagen")
DECODINGS = ("greedy", "beam", "sample")


@dataclass
class GenerationOptions:
    """Decoder size and default decoding, shared by the generative tasks' configs."""

    decoder_layers: int = 2
    grid_dim: int = 8  # channels per patch of the decoder's layout token (0 = none); see EncoderDecoder
    max_target_len: int = 32  # target tokens, [BOS] and [EOS] included; longer targets are truncated
    decoding: str = "greedy"  # greedy | beam | sample
    num_beams: int = 3
    length_penalty: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        check_decoding(self.decoding)
        if self.decoder_layers < 1 or self.max_target_len < 3 or self.num_beams < 1:
            raise ConfigError("decoder_layers and num_beams must be at least 1 and max_target_len at least 3")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError("decoding needs temperature > 0, 0 < top_p <= 1 and top_k >= 0")


def check_decoding(decoding: str) -> str:
    if decoding not in DECODINGS:
        raise ConfigError(f"unknown decoding {decoding!r}; choose one of: {', '.join(DECODINGS)}")
    return decoding


class GenerativeTask(Task):
    """Rows are (image index, prompt or None, target text, kind, extras); subclasses build rows and score."""

    def rows(self, meta: list[dict], train: bool) -> list[dict]:
        raise NotImplementedError

    @classmethod
    def build_model(cls, rc, tokenizer):
        cfg = cls.config_from(rc.task_config)
        return EncoderDecoder(rc.model, cfg.decoder_layers, cfg.max_target_len, grid_dim=cfg.grid_dim)

    def encode_prompts(self, prompts: list[str]):
        return self.encode_texts(prompts, "prompt")

    def encode_targets(self, targets: list[str]):
        """[BOS] tokens [EOS] padded to max_target_len."""
        tok = require_tokenizer(self.tokenizer, self.name)
        width = self.cfg.max_target_len
        ids = torch.full((len(targets), width), tok.pad_id, dtype=torch.long)
        for i, text in enumerate(targets):
            row = [tok.bos_id, *tok.tokenize(text)[: width - 2], tok.eos_id]
            ids[i, : len(row)] = torch.tensor(row)
        return ids, ids != tok.pad_id

    def build_split(self, images, meta, train):
        rows = self.rows(meta, train)
        target_ids, target_mask = self.encode_targets([r["target"] for r in rows])
        fields = {"target_ids": target_ids, "target_mask": target_mask, "kind": [r["kind"] for r in rows],
                  "references": [r.get("references") or [r["target"]] for r in rows],
                  "objects": [r.get("objects") for r in rows]}
        if any(r.get("prompt") is not None for r in rows):
            fields["prompt_ids"], fields["prompt_mask"] = self.encode_prompts([r.get("prompt") or "" for r in rows])
        return ExampleSplit(images, torch.tensor([r["image"] for r in rows], dtype=torch.long), fields)

    def training_step(self, model, batch):
        loss, logits = model(normalize_images(batch["images"]), batch["target_ids"], batch["target_mask"],
                             batch.get("prompt_ids"), batch.get("prompt_mask"))
        return {"loss": loss}

    def generate(self, model, images, prompt_ids=None, prompt_mask=None, **overrides) -> list[str]:
        c = self.cfg
        options = dict(decoding=c.decoding, num_beams=c.num_beams, length_penalty=c.length_penalty,
                       temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)
        options.update({k: v for k, v in overrides.items() if v is not None})
        check_decoding(options["decoding"])
        ids = model.generate(normalize_images(images), prompt_ids, prompt_mask, **options)
        return self.tokenizer.decode_batch(ids)

    @torch.no_grad()
    def validation_step(self, model, batch):
        loss, _ = model(normalize_images(batch["images"]), batch["target_ids"], batch["target_mask"],
                        batch.get("prompt_ids"), batch.get("prompt_mask"))
        texts = self.generate(model, batch["images"], batch.get("prompt_ids"), batch.get("prompt_mask"))
        return {"loss": loss.detach().float().expand(len(texts)).cpu(), "texts": texts, "kind": batch["kind"],
                "references": batch["references"], "objects": batch["objects"]}

    @staticmethod
    def gather(outputs):
        """Concatenate validation outputs: (loss, texts, kinds, references, objects)."""
        loss = float(torch.cat([o["loss"] for o in outputs]).mean())
        cat = lambda key: [x for o in outputs for x in o[key]]  # noqa: E731
        return loss, cat("texts"), cat("kind"), cat("references"), cat("objects")

    @torch.no_grad()
    def predict_texts(self, model, images, files, prompt=None, decoding=None, **_):
        prompt_ids = prompt_mask = None
        if prompt is not None:
            prompt_ids, prompt_mask = self.encode_prompts([prompt] * len(images))
        texts = self.generate(model, images, prompt_ids, prompt_mask, decoding=decoding)
        return [{"file": f, "text": t, "summary": t} for f, t in zip(files, texts)]
