"""Caption metrics: corpus BLEU-4, CIDEr-D and Shapes fact accuracy."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest

from imagen.data.shapes import ShapesWorld
from imagen.data.shapes_scene import COLORS, SHAPES
from imagen.data.shapes_text import caption
from imagen.eval.captioning import (caption_metrics, cider_d, corpus_bleu, fact_accuracy, parse_objects,
                                    tokenize)


@pytest.fixture(scope="module")
def shapes():
    world = ShapesWorld(seed=0)
    samples = [world.sample(i) for i in range(2000)]
    return [s["text"] for s in samples], [s["objects"] for s in samples]


def test_tokenize_lowercases_drops_punctuation_and_splits_cjk():
    assert tokenize("A Red circle, a blue square.") == ["a", "red", "circle", "a", "blue", "square"]
    assert tokenize("红色圆形在蓝色正方形的左边") == list("红色圆形在蓝色正方形的左边")


def test_chinese_captions_score_like_english_ones():
    assert corpus_bleu(["一个红色的圆形"], [["一个红色的圆形"]]) == pytest.approx(1.0)
    assert corpus_bleu(["一个蓝色的圆形"], [["一个红色的圆形"]]) < 1.0


# --- BLEU ---------------------------------------------------------------------------------------------------

def test_bleu_hand_computed_with_length_tie_going_to_shorter_reference():
    hyp = "a red circle and a blue square"  # 7 words; references of 6 and 8 words tie -> r = 6, no penalty
    refs = ["a red circle and a square", "a red circle and a green square here"]
    # Clipped matches: 1-grams 6/7 (blue misses), 2-grams 4/6, 3-grams 3/5, 4-grams 2/4.
    expected = (6 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25
    assert corpus_bleu([hyp], [refs]) == pytest.approx(expected, rel=1e-12)
    assert corpus_bleu([hyp], [refs[::-1]]) == pytest.approx(expected, rel=1e-12)  # order does not matter


def test_bleu_brevity_penalty_and_extremes():
    hyp = "a red circle and a blue square"
    assert corpus_bleu([hyp], [[hyp]]) == 1.0
    longer = hyp + " on the left"  # every n-gram matches; c = 7 < r = 10
    assert corpus_bleu([hyp], [[longer]]) == pytest.approx(math.exp(1 - 10 / 7), rel=1e-12)
    assert corpus_bleu(["green triangle"], [["a red circle"]]) == 0.0
    assert corpus_bleu(["a red circle"], [["a red circle"]]) == 0.0  # no 4-grams at all, no smoothing


def test_bleu_clips_repeated_words():
    # 'a a a a a' vs 'a a b c d e': 1-grams clip to 2/5, 2-grams 1/4 ('a a' once); BLEU-2 with c=5 < r=6.
    got = corpus_bleu(["a a a a a"], [["a a b c d e"]], max_n=2)
    assert got == pytest.approx(math.exp(1 - 6 / 5) * math.sqrt(2 / 5 * 1 / 4), rel=1e-12)


def test_bleu_matches_torchmetrics_on_shapes_captions(shapes):
    from torchmetrics.text import BLEUScore

    texts, objects = shapes
    rng = np.random.default_rng(5)
    hyps = texts[:300]
    refs = [[caption(objs, rng) for _ in range(3)] for objs in objects[:300]]
    ours = corpus_bleu(hyps, refs)
    # torchmetrics splits on spaces and takes the first closest reference: pre-tokenise, shortest first.
    tm_refs = [sorted((" ".join(tokenize(r)) for r in rs), key=lambda r: len(r.split())) for rs in refs]
    theirs = float(BLEUScore(n_gram=4)([" ".join(tokenize(h)) for h in hyps], tm_refs))
    assert 0.2 < ours < 1.0
    assert ours == pytest.approx(theirs, abs=1e-6)


def test_metrics_reject_mismatched_inputs():
    with pytest.raises(ValueError):
        corpus_bleu(["a"], [])
    with pytest.raises(ValueError):
        cider_d(["a"], [[]])


# --- CIDEr-D ------------------------------------------------------------------------------------------------

# Image 1: hypothesis 'a red circle', references 'a red circle' and 'a blue circle'.
# Image 2: hypothesis 'a square', reference 'a green square'.
HYPS = ["a red circle", "a square"]
REFS = [["a red circle", "a blue circle"], ["a green square"]]


def test_cider_d_hand_computed_unigrams():
    L = math.log(2)  # log(#images); 'a' is in both images' references, so its weight is L - log 2 = 0
    # Image 1, ref 1: identical vectors {red: L, circle: L} -> cosine 1, no length penalty.
    # Image 1, ref 2: {red: L, circle: L} . {blue: L, circle: L} = L^2, norms L*sqrt2 each -> 1/2.
    image1 = 10 * (1 + 1 / 2) / 2
    # Image 2: {square: L} . {green: L, square: L} = L^2 over L * L*sqrt2; lengths 2 vs 3.
    image2 = 10 * (L * L) / (L * L * math.sqrt(2)) * math.exp(-1 / (2 * 6.0 ** 2))
    assert cider_d(HYPS, REFS, n=1) == pytest.approx((image1 + image2) / 2, rel=1e-12)


def test_cider_d_hand_computed_four_grams():
    # Per n = 1..4: image 1 scores [1, 1, 1, 0] against ref 1 (no 4-grams in three words) and [1/2, 0, 0, 0]
    # against ref 2 (no shared weighted bigram or trigram); image 2 only scores its unigram cosine.
    image1 = 10 * ((1 + 1 + 1 + 0) / 4 + (1 / 2) / 4) / 2
    image2 = 10 * (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
    assert cider_d(HYPS, REFS) == pytest.approx((image1 + image2) / 2, rel=1e-12)


def test_cider_d_clips_repeated_words():
    # 'circle circle' has weight 2L against the reference's L: clipped dot min(2L, L) * L = L^2 over norms 2L * L
    # gives 1/2 (unclipped it would be 1), times the penalty for lengths 2 vs 1. Image 2 matches exactly: 10.
    got = cider_d(["circle circle", "square"], [["circle"], ["square"]], n=1)
    assert got == pytest.approx((10 * 0.5 * math.exp(-1 / 72) + 10) / 2, rel=1e-12)


def test_cider_d_perfect_and_disjoint():
    hyps = ["a red circle on the left", "two green squares at the bottom"]
    assert cider_d(hyps, [[h] for h in hyps]) == pytest.approx(10.0)
    assert cider_d(hyps, [[hyps[1]], [hyps[0]]]) == 0.0
    assert cider_d([], []) == 0.0


# --- Shapes fact accuracy -----------------------------------------------------------------------------------

def test_parse_objects_examples():
    assert parse_objects("a red circle") == Counter({("red", "circle"): 1})
    assert parse_objects("a small blue square in the top left") == Counter({("blue", "square"): 1})
    assert parse_objects("two green triangles") == Counter({("green", "triangle"): 2})
    assert parse_objects("a red circle to the left of a blue square") == Counter(
        {("red", "circle"): 1, ("blue", "square"): 1})
    assert parse_objects("there are two cyan squares and a small red circle on the left") == Counter(
        {("cyan", "square"): 2, ("red", "circle"): 1})
    assert parse_objects("an image of a large yellow triangle at the bottom") == Counter({("yellow", "triangle"): 1})
    assert parse_objects("A Red circle and a red circle.") == Counter({("red", "circle"): 2})
    assert parse_objects("a circle and a purple thing") == Counter({(None, "circle"): 1, ("purple", None): 1})


def test_fact_accuracy_is_one_on_true_shapes_captions(shapes):
    texts, objects = shapes
    assert len({len(o) for o in objects}) == 3  # one, two and three objects all occur
    assert any(re.search(r"\b(two|three) ", t) for t in texts)
    assert fact_accuracy(texts, objects) == 1.0


def _swap_color(text, rng):
    words = [w for w in text.split() if w in COLORS]
    old = words[rng.integers(len(words))]
    new = [c for c in COLORS if c != old][rng.integers(len(COLORS) - 1)]
    return re.sub(rf"\b{old}\b", new, text, count=1)


def _change_shape(text, rng):
    old = [w for w in re.findall(r"[a-z]+", text) if w.rstrip("s") in SHAPES][0]
    stem = old.rstrip("s")
    new = [s for s in SHAPES if s != stem][rng.integers(len(SHAPES) - 1)] + old[len(stem):]
    return re.sub(rf"\b{old}\b", new, text, count=1)


def test_fact_accuracy_rejects_corrupted_captions(shapes):
    texts, objects = shapes
    rng = np.random.default_rng(0)
    n = 500
    extra = [{"color": "red", "shape": "circle", "size": "small", "position": "center", "box": [0, 0, 8, 8]}]
    corrupted = {
        "colour swapped": [_swap_color(t, rng) for t in texts[:n]],
        "shape changed": [_change_shape(t, rng) for t in texts[:n]],
        "object added": [caption(objs + extra, rng) for objs in objects[:n]],
    }
    for kind, captions in corrupted.items():
        assert fact_accuracy(captions, objects[:n]) == 0.0, kind
    several = [i for i in range(n) if len(objects[i]) > 1]
    dropped = [caption(objects[i][:-1], rng) for i in several]
    assert len(several) > 100 and fact_accuracy(dropped, [objects[i] for i in several]) == 0.0
    # The other way round: a true caption judged against one object too many or too few.
    assert fact_accuracy(texts[:n], [objs + extra for objs in objects[:n]]) == 0.0
    assert fact_accuracy([texts[i] for i in several], [objects[i][:-1] for i in several]) == 0.0


def test_fact_accuracy_counts_share_and_checks_lengths():
    objs = [[{"color": "red", "shape": "circle"}], [{"color": "blue", "shape": "square"}] * 2]
    assert fact_accuracy(["a red circle", "a blue square"], objs) == 0.5
    assert fact_accuracy(["a red circle", "two blue squares"], objs) == 1.0
    assert fact_accuracy(["a circle", "two blue squares"], objs) == 0.5  # no colour: never right
    with pytest.raises(ValueError):
        fact_accuracy(["a red circle"], objs)


def test_caption_metrics_bundle(shapes):
    texts, objects = shapes
    refs = [[t] for t in texts[:50]]
    out = caption_metrics(texts[:50], refs, objects[:50])
    assert set(out) == {"bleu4", "cider", "fact_accuracy"}
    assert out["bleu4"] == pytest.approx(1.0) and out["fact_accuracy"] == 1.0 and out["cider"] > 5
    assert set(caption_metrics(texts[:50], refs)) == {"bleu4", "cider"}
