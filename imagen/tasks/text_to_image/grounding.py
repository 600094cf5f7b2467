"""The grounding loss: a stage's cross-attention taught where each named object is (TokenCompose, Wang et al. 2024).

A denoising loss alone lets the U-Net draw "a purple circle and a green square" as two circles: nothing tells
the pixels of one object to read the words of that object. With object masks (`imagen.data.grounding`) each
phrase's tokens get two terms per cross-attention map, at every resolution it runs at:

- token term: (1 - share of the phrase's attention mass that falls inside its mask)^2 - the phrase looks at its
  object;
- pixel term: binary cross-entropy between the attention each pixel pays the phrase and the mask's coverage - the
  object's pixels read its phrase (weighted PIXEL_SHARE, as TokenCompose weighs it against the token term).

The stage's `grounding_weight` scales their sum beside the diffusion loss; 0 (the default) trains without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imagen.data.grounding import MAX_PHRASES, phrase_spans, phrase_tokens, scene_phrases
from imagen.errors import ConfigError, DataError

PIXEL_SHARE = 0.05  # TokenCompose's lambda_pixel / lambda_token (5e-5 / 1e-3)


def grounding_loss(maps: list[torch.Tensor], tokens: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the recorded maps of the token + PIXEL_SHARE * pixel terms of the valid phrases.

    maps: (B, H*W, 1 + L) cross-attention probabilities (key 0: the null text token), square H = W;
    tokens: (B, P, L) bool, the phrase's token positions; masks: (B, P, h, w) coverage in [0, 1]; valid: (B, P)."""
    weight = valid.float()
    count = weight.sum().clamp_min(1.0)
    terms, pooled = [], {}
    for probs in maps:
        side = int(round(probs.shape[1] ** 0.5))
        if side not in pooled:  # several maps share a resolution
            pooled[side] = F.adaptive_avg_pool2d(masks.float(), side).flatten(2)  # (B, P, Q)
        m = pooled[side]
        attn = torch.einsum("bqs,bps->bpq", probs[:, :, 1:tokens.shape[-1] + 1].float(), tokens.float())  # (B, P, Q)
        inside = (attn * m).sum(-1) / attn.sum(-1).clamp_min(1e-6)
        token = (1.0 - inside) ** 2
        pixel = F.binary_cross_entropy(attn.clamp(1e-6, 1 - 1e-6), m.clamp(0, 1), reduction="none").mean(-1)
        terms.append(((token + PIXEL_SHARE * pixel) * weight).sum() / count)
    return torch.stack(terms).mean()


def check_grounding(dataset, encoder, stage: str) -> None:
    """Refuse, before anything is written, a grounded stage whose data has no object annotations or whose text
    encoder cannot say which token is which word."""
    _require_objects(dataset[0] if len(dataset) else {}, f"{stage}.grounding_weight", dataset.name)
    if not getattr(encoder, "frozen", False):
        raise ConfigError(f"{stage}.grounding_weight needs a frozen text encoder (the default, minilm)")
    encoder.token_offsets(["a"])  # a TextEncoderError for an encoder without character offsets


def _require_objects(sample: dict, what: str, data: str) -> list[dict]:
    """The sample's objects; a DataError when it has none with colour, shape and box."""
    objects = sample.get("objects")
    if not objects or not all({"color", "shape", "box"} <= set(o) for o in objects):
        raise DataError(f"{what} needs each training image's objects (colour, shape and box, as the Shapes world "
                        f"gives them); {data!r} has an image without them: train without it")
    return objects


def image_phrases(dataset, size: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Per image of `dataset`: (phrase, (size, size) coverage mask) for each distinct colour-shape it shows, from
    its object annotations (colour, shape, box: the Shapes world's), masks drawn at the image's size and averaged
    down to `size`."""
    out = []
    for i in range(len(dataset)):
        sample = dataset[i]
        objects = _require_objects(sample, f"grounding (sample {i})", dataset.name)
        canvas = max(sample["image"].size)
        out.append([(phrase, F.adaptive_avg_pool2d(torch.from_numpy(mask)[None], size)[0])
                    for phrase, mask in scene_phrases(objects, canvas)])
    return out


def grounding_targets(phrases: list[list[tuple[str, torch.Tensor]]], texts: list[str], caption_images: torch.Tensor,
                      caption_ids: torch.Tensor, offsets: list[list[tuple[int, int]]], length: int, size: int):
    """Targets of each (image, caption) entry of a T2ISplit: tokens (N, P, length) bool, valid (N, P) bool, and
    the per-image masks (images, P, size, size). A phrase its caption does not name (or names past the encoder's
    max length) is not valid."""
    masks = torch.zeros(len(phrases), MAX_PHRASES, size, size)
    for i, items in enumerate(phrases):
        for p, (_, mask) in enumerate(items[:MAX_PHRASES]):
            masks[i, p] = mask
    tokens = torch.zeros(len(caption_ids), MAX_PHRASES, length, dtype=torch.bool)
    for j, (image, cap) in enumerate(zip(caption_images.tolist(), caption_ids.tolist())):
        for p, (phrase, _) in enumerate(phrases[image][:MAX_PHRASES]):
            positions = [k for k in phrase_tokens(offsets[cap], phrase_spans(texts[cap], phrase)) if k < length]
            tokens[j, p, positions] = True
    return tokens, tokens.any(-1), masks
