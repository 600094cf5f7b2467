"""The best exact-caption recall@1 any model can reach on Shapes retrieval, and why `facts_r@1` exists.

    python bench/retrieval_ceiling.py [--split test] [--n 1000] [--draws 300]

A Shapes caption adds choices no image determines (a filler prefix, optional size and position words, the order
of the objects). This script enumerates, per test image, the captions the generator writes for its objects
(`--draws` random draws) and scores an oracle that knows every object exactly: for an image it ranks first,
uniformly, one of the test captions that truly describe it; a hit needs the identical text. The result bounds
`r@1` / `t2i_r@1` of `imagen evaluate` on a retrieval run.
"""

from __future__ import annotations

import argparse

import numpy as np

from imagen.data.files import SPLITS
from imagen.data.shapes import ShapesWorld
from imagen.data.shapes_text import caption


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--draws", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    world = ShapesWorld(seed=args.seed * 3 + SPLITS.index(args.split))  # the registry's stream for this split
    samples = [world.sample(i) for i in range(args.n)]
    captions = [s["text"] for s in samples]
    possible = [set(caption(s["objects"], np.random.default_rng([12345, t])) for t in range(args.draws)) for s in samples]
    i2t, t2i = [], []
    for i in range(args.n):
        true_texts = [j for j in range(args.n) if captions[j] in possible[i]]  # texts that describe image i
        i2t.append(np.mean([captions[j] == captions[i] for j in true_texts]))
        true_images = [j for j in range(args.n) if captions[i] in possible[j]]  # images text i describes
        t2i.append(np.mean([captions[j] == captions[i] for j in true_images]))
    print(f"{args.split} {args.n} pairs: oracle r@1 {np.mean(i2t):.3f}, t2i_r@1 {np.mean(t2i):.3f}")


if __name__ == "__main__":
    main()
