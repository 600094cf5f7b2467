"""The two readers of text-to-image pictures on the world's own renderings: how often each reads a true scene right.

    python bench/t2i_readers.py [--n-per-category 200]

Held-out prompts of every category (evaluate-t2i's), each drawn exactly as its scene, at 32 px, at 64 px and
downsized to 32, and at 16 px and upsized to 32 (how a 16 px base stage is scored). Both readers score them: the
learned Shapes evaluator and the non-learned pixel check. A reader's figure here is its ceiling: what a perfect
generator would score with it. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import subprocess
import time

import torch

from imagen.data.image_files import resize_uint8
from imagen.eval.evaluator import get_evaluator
from imagen.eval.pixel_check import PixelChecker
from imagen.eval.t2i import CATEGORIES, compositional_accuracy, compositional_prompts, render_expected


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-per-category", type=int, default=200)
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    evaluator = get_evaluator(32)
    print("| drawn at | reader | " + " | ".join(CATEGORIES) + " | all | seconds (drawing + both readers) | commit |")
    print("| --- | --- | " + " | ".join("---" for _ in CATEGORIES) + " | --- | --- | --- |")
    for size in (32, 64, 16):
        prompts = compositional_prompts(args.n_per_category, size=size)
        by_text: dict[str, list[dict]] = {}
        for q in prompts:
            by_text.setdefault(q["prompt"], []).append(q)
        queue = {t: list(qs) for t, qs in by_text.items()}

        def draw(texts):  # each prompt's own scene (a prompt text can occur twice with other placements)
            return resize_uint8(torch.stack([render_expected(queue[t].pop(0)["expected"]) for t in texts]), 32)

        start = time.time()
        r = compositional_accuracy(draw, prompts, evaluator, batch_size=64, cross_check=PixelChecker())
        seconds = time.time() - start
        for name, prefix in (("learned evaluator", ""), ("pixel check", "pixel_")):
            cells = " | ".join(f"{r[f'{prefix}{c}_accuracy']:.3f}" for c in CATEGORIES)
            print(f"| {size} px{'' if size == 32 else ' -> 32'} | {name} | {cells} | {r[prefix + 'compositional_accuracy']:.3f} "
                  f"| {seconds:.1f} | {commit} |", flush=True)


if __name__ == "__main__":
    main()
