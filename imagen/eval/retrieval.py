"""Image-text retrieval metrics (recall@k both ways) and zero-shot classification accuracy.

Recall@k (Karpathy & Fei-Fei 2015; CLIP's retrieval tables) is the share of queries with at least one relevant
item among their k most similar gallery items. The functions here take a similarity matrix and a boolean
"relevant" matrix, so what counts as a hit is the caller's choice:

- With unique captions, `caption_relevance` is the identity matrix and recall@k is the standard definition.
- With repeated captions (the Shapes world says "a red circle" many times), an item counts as a hit when its
  caption text is identical to the query's ground-truth caption: retrieving another image captioned
  "a red circle" for the text "a red circle" is right, not a miss.
- On the Shapes world `fact_recall` also counts a hit when the caption names exactly the image's objects
  (colour and shape, each once; `eval.captioning.parse_objects`). Exact text match caps image->text R@1 near
  0.66 even for a perfect model, because captions add random prefixes, sizes, positions and object orders
  that no image determines; fact-level relevance asks only what the caption asserts about objects.

Zero-shot classification (CLIP, Radford et al. 2021): every class name is written into a few prompt templates,
the normalised text embeddings of a class are averaged (and renormalised) into one class embedding, and an
image takes the class of highest cosine similarity.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
import torch.nn.functional as F

from .captioning import parse_objects

KS = (1, 5, 10)


def caption_relevance(query_captions: Sequence[str], gallery_captions: Sequence[str] | None = None) -> torch.Tensor:
    """(Q, G) bool: True where the gallery item's caption text equals the query's (exact string match)."""
    gallery = query_captions if gallery_captions is None else gallery_captions
    index: dict[str, int] = {}
    q = torch.tensor([index.setdefault(c, len(index)) for c in query_captions])
    g = torch.tensor([index.setdefault(c, len(index)) for c in gallery])
    return q[:, None] == g[None, :]


def recall_at_k(similarity: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = KS) -> dict[int, float]:
    """{k: share of rows (queries) with a relevant column among their k highest similarities}.

    `similarity` and `relevant` are (Q, G); k larger than G counts the whole gallery. Queries without any relevant
    item count as misses. Ties are broken by torch.topk's order.
    """
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and relevant {tuple(relevant.shape)} differ in shape")
    if similarity.shape[0] == 0:
        raise ValueError("recall@k needs at least one query")
    kmax = min(max(ks), similarity.shape[1])
    top = similarity.topk(kmax, dim=1).indices  # (Q, kmax)
    hits = relevant.bool().gather(1, top)  # (Q, kmax): is the r-th retrieved item relevant?
    return {k: float(hits[:, :k].any(1).float().mean()) for k in ks}


def retrieval_metrics(image_embeds: torch.Tensor, text_embeds: torch.Tensor, captions: Sequence[str],
                      ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@k image->text (`r@k`) and text->image (`t2i_r@k`) over N paired, normalised embeddings, and their mean.

    Row i of `image_embeds` and of `text_embeds` belong together; hits follow `caption_relevance(captions)`.
    """
    if not len(image_embeds) == len(text_embeds) == len(captions):
        raise ValueError(f"{len(image_embeds)} images, {len(text_embeds)} texts and {len(captions)} captions differ in number")
    sim = image_embeds.float() @ text_embeds.float().t()  # (N images, N texts)
    relevant = caption_relevance(captions)  # symmetric: caption equality
    i2t = recall_at_k(sim, relevant, ks)
    t2i = recall_at_k(sim.t(), relevant.t(), ks)
    metrics = {f"r@{k}": v for k, v in i2t.items()}
    metrics.update({f"t2i_r@{k}": v for k, v in t2i.items()})
    metrics["r_mean"] = (sum(i2t.values()) + sum(t2i.values())) / (2 * len(ks))
    return metrics


def fact_recall(image_embeds: torch.Tensor, text_embeds: torch.Tensor, captions: Sequence[str],
                objects: Sequence[Sequence[dict]], ks: Sequence[int] = KS) -> dict[str, float]:
    """`facts_r@k` / `facts_t2i_r@k`: recall@k where a caption is relevant to every image whose objects it names."""
    keys: dict[tuple, int] = {}
    said = torch.tensor([keys.setdefault(tuple(sorted(parse_objects(c).items(), key=str)), len(keys)) for c in captions])
    truth = torch.tensor([keys.setdefault(tuple(sorted(Counter((o["color"], o["shape"]) for o in obj).items(), key=str)), len(keys))
                          for obj in objects])
    relevant = truth[:, None] == said[None, :]  # (images, texts)
    sim = image_embeds.float() @ text_embeds.float().t()
    i2t, t2i = recall_at_k(sim, relevant, ks), recall_at_k(sim.t(), relevant.t(), ks)
    return {**{f"facts_r@{k}": v for k, v in i2t.items()}, **{f"facts_t2i_r@{k}": v for k, v in t2i.items()}}


def contrastive_loss(logits: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on (N, N) image-to-text logits; items with the same caption share the target mass."""
    targets = same.float() / same.float().sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets.t()))


def class_embeddings(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """(C, T, D) text embeddings of C classes x T templates -> (C, D): the renormalised mean of the normalised ones."""
    if prompt_embeds.ndim != 3:
        raise ValueError(f"expected (classes, templates, dim) prompt embeddings, got shape {tuple(prompt_embeds.shape)}")
    return F.normalize(F.normalize(prompt_embeds.float(), dim=-1).mean(1), dim=-1)


def zero_shot_predict(image_embeds: torch.Tensor, class_embeds: torch.Tensor) -> torch.Tensor:
    """(N,) index of the class embedding most similar (cosine) to each image embedding."""
    return (F.normalize(image_embeds.float(), dim=-1) @ F.normalize(class_embeds.float(), dim=-1).t()).argmax(1)


def zero_shot_accuracy(image_embeds: torch.Tensor, class_embeds: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images whose most similar class embedding is their label; rows labelled -1 are left out."""
    keep = labels >= 0
    if not bool(keep.any()):
        raise ValueError("zero-shot accuracy needs at least one labelled image")
    preds = zero_shot_predict(image_embeds[keep], class_embeds)
    return float((preds == labels[keep]).float().mean())
