"""Does the frozen text encoder bind colours to shapes? Linear probes on its token states and its pooled vector.

    python bench/t2i_text_probe.py [--text-encoder minilm] [--folds 5]

A text-to-image stage can draw "a purple circle and a green square" right only if what it reads says which colour
goes with which shape. This bench asks that of the encoder alone, before any U-Net: every two-object caption of the
Shapes templates whose objects differ in colour and in shape ("and" captions and the four relations, 900 in all) is
encoded once, and a logistic regression (scikit-learn, standardised features) reads, on folds that hold out whole
pairs of colours with pairs of shapes (red and blue with circle and square: every wording, both orders, and the
swapped binding "a red square ... a blue circle" are in one fold, so no probe has seen the held-out captions' words
together)

- from a shape word's token state (what cross-attention sees at that word): the colour of that object, and of the
  other object;
- from a colour word's token state: the shape of that object, and of the other;
- from the pooled vector (what the stage adds to its timestep embedding), given which shape is asked about: that
  shape's colour;
- as a control, from the caption's bag of words (word counts, order lost), given the asked shape: that shape's
  colour. A caption and its swapped one ("a red square and a blue circle") have the same bag, so this reads 0.5.

"binding" is the share of held-out captions where the probe, choosing between the caption's two colours (or two
shapes), picks the asked object's: 0.5 is a reading that knows both words are present but not which goes where;
"6-way" / "3-way" is plain accuracy over every colour / shape. Nothing is trained but the probes (seconds).
"""

from __future__ import annotations

import argparse
import itertools
import subprocess

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from imagen.data.shapes_scene import COLORS, SHAPES
from imagen.models.text_encoders import text_encoder_from_arg
from imagen.train.device import cpu_name

RELATIONS = ("to the left of", "to the right of", "above", "below")


def captions() -> list[dict]:
    """Every two-object caption with two colours and two shapes: its text and the character span of each word."""
    out = []
    for (c1, c2), (s1, s2) in itertools.product(itertools.permutations(COLORS, 2), itertools.permutations(SHAPES, 2)):
        for joiner in ("and",) + RELATIONS:
            words = ["a", c1, s1, *joiner.split(), "a", c2, s2]
            text, spans, at = " ".join(words), [], 0
            for w in words:
                spans.append((at, at + len(w)))
                at += len(w) + 1
            i1, i2 = 1, len(words) - 2  # the two colour words; each shape word follows its colour
            out.append({"text": text, "colors": (c1, c2), "shapes": (s1, s2), "joiner": joiner,
                        "color_span": (spans[i1], spans[i2]), "shape_span": (spans[i1 + 1], spans[i2 + 1])})
    return out


def word_state(states, offsets, span) -> np.ndarray:
    """The token state of a word (its last sub-word token: the one that has read the whole word)."""
    idx = [t for t, (a, b) in enumerate(offsets) if b > a and a >= span[0] and b <= span[1]]
    if not idx:
        raise SystemExit(f"no token covers characters {span}: the tokenizer splits the caption unexpectedly")
    return states[idx[-1]]


def probe(x: np.ndarray, y: np.ndarray, pair: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> tuple[float, float]:
    """Cross-validated (binding, plain) accuracy: x (N, D) features, y (N,) class ids, pair (N, 2) the two candidate
    classes present in the caption (y is one of them); folds split whole `groups` (colour pair x shape pair),
    never one group's rows across train and test."""
    ids = np.unique(groups)
    bind, plain = np.zeros(len(y), bool), np.zeros(len(y), bool)
    for train_ids, test_ids in KFold(folds, shuffle=True, random_state=seed).split(ids):
        tr, te = np.isin(groups, ids[train_ids]), np.isin(groups, ids[test_ids])
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1)).fit(x[tr], y[tr])
        scores = np.full((te.sum(), int(y.max()) + 1), -np.inf)
        scores[:, clf.classes_] = clf.decision_function(x[te])
        plain[te] = scores.argmax(1) == y[te]
        two = np.take_along_axis(scores, pair[te], 1)  # (n, 2): the caption's two candidates
        bind[te] = pair[te][np.arange(te.sum()), two.argmax(1)] == y[te]
    return float(bind.mean()), float(plain.mean())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text-encoder", default="minilm", help="as `imagen train-t2i --text-encoder` (default: minilm)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    caps = captions()
    encoder = text_encoder_from_arg(args.text_encoder)
    texts = [c["text"] for c in caps]
    enc = encoder.encode(texts)
    offsets = encoder.token_offsets(texts)
    states, pooled = enc.states.numpy(), enc.pooled.numpy()
    colors, shapes = list(COLORS), list(SHAPES)

    vocab = sorted({w for t in texts for w in t.split()})
    pair_ids: dict[tuple, int] = {}
    rows = {}  # name -> (features, target, candidate pair, group: the colour pair with the shape pair)
    def add(name, feats, target, pair, cap):
        f, t, pr, g = rows.setdefault(name, ([], [], [], []))
        f.append(feats), t.append(target), pr.append(pair), g.append(cap)

    for n, c in enumerate(caps):
        cpair = [colors.index(k) for k in c["colors"]]
        spair = [shapes.index(k) for k in c["shapes"]]
        group = pair_ids.setdefault((frozenset(c["colors"]), frozenset(c["shapes"])), len(pair_ids))
        bag = np.array([c["text"].split().count(w) for w in vocab], float)
        for k in (0, 1):
            shape_state = word_state(states[n], offsets[n], c["shape_span"][k])
            color_state = word_state(states[n], offsets[n], c["color_span"][k])
            add("shape word's state -> its object's colour", shape_state, cpair[k], cpair, group)
            add("shape word's state -> the other object's colour", shape_state, cpair[1 - k], cpair, group)
            add("colour word's state -> its object's shape", color_state, spair[k], spair, group)
            add("colour word's state -> the other object's shape", color_state, spair[1 - k], spair, group)
            query = np.eye(len(shapes))[spair[k]]
            add("pooled vector x asked shape -> that shape's colour", np.kron(query, pooled[n]), cpair[k], cpair, group)
            add("control: bag of words x asked shape -> that shape's colour", np.kron(query, bag), cpair[k], cpair, group)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"CPU: {cpu_name()}; commit {commit}; text encoder {encoder.name} ({encoder.dim}-d); {len(caps)} captions "
          f"(\"and\" and {len(RELATIONS)} relations, two colours and two shapes each); {args.folds}-fold probes, colour pair x shape pair held out\n")
    print("| features -> target | binding (two candidates; chance 0.5) | plain accuracy (chance 1/6 colours, 1/3 shapes) |")
    print("| --- | --- | --- |")
    for name, (f, t, pr, g) in rows.items():
        bind, plain = probe(np.stack(f), np.array(t), np.array(pr), np.array(g), args.folds, args.seed)
        print(f"| {name} | {bind:.3f} | {plain:.3f} |")


if __name__ == "__main__":
    main()
