"""Caption metrics: corpus BLEU-4, CIDEr-D and, for the Shapes world, fact accuracy.

All text is lower-cased, punctuation dropped and CJK characters split one per token (``tokenize``).

- BLEU-4 (Papineni et al. 2002, "BLEU: a method for automatic evaluation of machine translation"): n-gram
  counts of each hypothesis are clipped by their largest count in any one reference and summed over the corpus
  into precisions p1..p4; the score is BP * (p1 p2 p3 p4)^(1/4), with brevity penalty BP = min(1, exp(1 - r/c))
  for c hypothesis words and r the summed lengths of the reference closest in length to each hypothesis
  (ties go to the shorter one). Between 0 and 1; 0 when any precision is 0 (no smoothing).
- CIDEr-D (Vedantam et al. 2015, "CIDEr: Consensus-based image description evaluation"), as computed by the
  coco-caption toolkit: each sentence becomes one TF-IDF vector per n-gram order n = 1..4, term frequency (the
  raw count) times log(#images) - log(max(1, df)), df being the number of images whose references contain the
  n-gram. A hypothesis scores against each reference the cosine per n, with the hypothesis weights clipped by the
  reference weights, times the length penalty exp(-(len_h - len_r)^2 / (2 sigma^2)); these are averaged over n
  and over the references and multiplied by 10. The corpus score is the mean over images (0 to about 10).
- Fact accuracy (Shapes world only): the share of captions naming exactly the image's objects, i.e. whose
  multiset of (colour, shape) mentions, as read by ``parse_objects``, equals that of the objects.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

from imagen.data.shapes_scene import COLORS, SHAPES, SIZES

# CJK characters are one token each (as sacrebleu's zh tokenizer has it); other words are runs of word
# characters. Punctuation is dropped, as coco-caption's PTB tokenizer drops it before BLEU and CIDEr.
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")
NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
SHAPE_WORDS = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}}


def tokenize(text: str) -> list[str]:
    """'A red circle, left.' -> ['a', 'red', 'circle', 'left']; '红色圆形' -> ['红', '色', '圆', '形']"""
    return _TOKEN.findall(str(text).lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every hypothesis needs at least one reference")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU-max_n in [0, 1] (uniform weights, no smoothing)."""
    _check(hypotheses, references)
    matched, total = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        h, rs = tokenize(hyp), [tokenize(r) for r in refs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]  # closest length, ties -> shorter
        for n in range(1, max_n + 1):
            counts = _ngrams(h, n)
            most = Counter()
            for r in rs:
                most |= _ngrams(r, n)  # | keeps the larger count per n-gram
            matched[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            total[n - 1] += sum(counts.values())
    if hyp_len == 0 or min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / max_n
    brevity = min(0.0, 1.0 - ref_len / hyp_len)
    return math.exp(brevity + log_precision)


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> float:
    """Corpus CIDEr-D: the mean per-image score, document frequencies taken over these references."""
    _check(hypotheses, references)
    if not hypotheses:
        return 0.0
    hyps = [tokenize(h) for h in hypotheses]
    refs = [[tokenize(r) for r in rs] for rs in references]
    df: Counter = Counter()
    for rs in refs:
        df.update({g for r in rs for k in range(1, n + 1) for g in _ngrams(r, k)})
    log_images = math.log(len(hyps))

    def vectors(tokens):
        vecs = []
        for k in range(1, n + 1):
            vec = {g: c * (log_images - math.log(max(1.0, df[g]))) for g, c in _ngrams(tokens, k).items()}
            vecs.append((vec, math.sqrt(sum(v * v for v in vec.values()))))
        return vecs

    scores = []
    for h, rs in zip(hyps, refs):
        hv = vectors(h)
        total = 0.0
        for r in rs:
            penalty = math.exp(-((len(h) - len(r)) ** 2) / (2 * sigma ** 2))
            for (hvec, hnorm), (rvec, rnorm) in zip(hv, vectors(r)):
                if hnorm and rnorm:
                    dot = sum(min(w, rvec.get(g, 0.0)) * rvec.get(g, 0.0) for g, w in hvec.items())
                    total += dot / (hnorm * rnorm) * penalty
        scores.append(10.0 * total / (n * len(rs)))
    return sum(scores) / len(scores)


def parse_objects(caption: str) -> Counter:
    """The (colour, shape) objects an English Shapes caption names, with multiplicity.

    A colour word directly followed by a shape word (singular or plural) is one mention; a number word before it
    (a/an/one/two/three, size words such as 'small' may come between) gives its count, 1 by default. A shape
    without a colour counts as (None, shape) and a colour without a shape as (colour, None): neither can match.
    """
    words = tokenize(caption)
    found: Counter = Counter()
    i = 0
    while i < len(words):
        color = words[i] if words[i] in COLORS else None
        shape = SHAPE_WORDS.get(words[i + 1] if color and i + 1 < len(words) else words[i])
        if color is None and shape is None:
            i += 1
            continue
        j = i - 1
        while j >= 0 and words[j] in SIZES:
            j -= 1
        found[(color, shape)] += NUMBER_WORDS.get(words[j], 1) if j >= 0 else 1
        i += 2 if color and shape else 1
    return found


def fact_accuracy(captions: Sequence[str], objects: Sequence[Sequence[dict]]) -> float:
    """Share of captions whose parsed objects equal the image's (colour, shape) multiset exactly."""
    if len(captions) != len(objects):
        raise ValueError(f"{len(captions)} captions but {len(objects)} object lists")
    if not captions:
        return 0.0
    right = sum(parse_objects(c) == Counter((o["color"], o["shape"]) for o in objs)
                for c, objs in zip(captions, objects))
    return right / len(captions)


def caption_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                    objects: Sequence[Sequence[dict]] | None = None) -> dict[str, float]:
    """{'bleu4', 'cider'} and, with the Shapes objects of each image, 'fact_accuracy'."""
    out = {"bleu4": corpus_bleu(hypotheses, references), "cider": cider_d(hypotheses, references)}
    if objects is not None:
        out["fact_accuracy"] = fact_accuracy(hypotheses, objects)
    return out
