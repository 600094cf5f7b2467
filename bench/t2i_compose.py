"""Composed prompts on two-object scenes: does sampling each named object as its own conditional branch
(composable diffusion's conjunction, Liu et al. 2022: `SamplingConfig(compose=True)`) fix colour-shape binding?

    python bench/t2i_compose.py --run RUN [--n-per-category 200] [--guidance 3] [--variants plain,objects,prompt+objects]

Every variant samples the same held-out Shapes prompts (the evaluator's four categories, one picture each, the
same seeds) and both readers score them (the learned evaluator / the non-learned pixel check); a second table
counts how the relation and "and" prompts fail under each variant:

    plain            each prompt as it is, classifier-free guidance (2 U-Net calls per step)
    objects          "and" prompts as their objects' conjunction ("a purple circle AND a green circle": 3 calls);
                     the other categories as plain
    prompt+objects   relation and "and" prompts as the prompt and each of its objects ("a red circle to the left of
                     a blue square AND a red circle AND a blue square": 4 calls); single and count prompts as plain

Every part is guided at --guidance. Inference only: a trained run is sampled (every stage it has; a base-only run
is scored at its base stage, upscaled), nothing is trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import time

from imagen.config import DEFAULT_GUIDANCE, DEFAULT_SAMPLING_STEPS
from imagen.data.image_files import resize_uint8, to_uint8
from imagen.data.shapes_text import object_phrase
from imagen.eval import evaluator as evaluator_module
from imagen.eval.pixel_check import PixelChecker
from imagen.eval.t2i import CATEGORIES, FAILURE_KINDS, compositional_accuracy, compositional_prompts
from imagen.pipelines import SamplingConfig, TextToImagePipeline
from imagen.pipelines.text_to_image import COMPOSE_SEPARATOR
from imagen.train import resolve_device

VARIANTS = ("plain", "objects", "prompt+objects")


def composed(prompt: dict, variant: str) -> str:
    """The text a variant samples for one held-out prompt."""
    objects = [object_phrase(o, "en") for o in prompt["expected"]["objects"]]
    joiner = f" {COMPOSE_SEPARATOR} "
    if variant == "objects" and prompt["category"] == "and":
        return joiner.join(objects)
    if variant == "prompt+objects" and prompt["category"] in ("relation", "and"):
        return joiner.join([prompt["prompt"], *objects])
    return prompt["prompt"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a trained text-to-image run")
    p.add_argument("--n-per-category", type=int, default=200)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=DEFAULT_SAMPLING_STEPS)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = str(resolve_device(args.device))
    pipe = TextToImagePipeline.from_run(args.run, device=device)
    evaluator = evaluator_module.get_evaluator(32, device=device)
    prompts = compositional_prompts(args.n_per_category, size=32)  # evaluate-t2i's held-out prompts (seed 0)
    print(f"{args.run}: stages {', '.join(pipe.stage_names)}; {args.n_per_category} prompts per category; "
          f"{args.steps} steps, guidance {args.guidance:g} per part; commit {commit}")
    print("| variant | " + " | ".join(CATEGORIES) + " | all prompts | s / picture |")
    print("| --- | " + " | ".join("---" for _ in CATEGORIES) + " | --- | --- |")
    failures = {}
    for variant in variants:
        texts = {q["prompt"]: composed(q, variant) for q in prompts}
        config = SamplingConfig(steps=args.steps, guidance=args.guidance, compose=variant != "plain",
                                batch_size=args.batch_size)

        def generate(batch, config=config, texts=texts):
            images = pipe.generate([texts[t] for t in batch], dataclasses.replace(config, n=1))
            return resize_uint8(to_uint8(images), 32)

        start = time.perf_counter()
        r = compositional_accuracy(generate, prompts, evaluator, batch_size=args.batch_size, cross_check=PixelChecker())
        seconds = (time.perf_counter() - start) / len(prompts)
        cells = [f"{r[f'{c}_accuracy']:.3f} / {r[f'pixel_{c}_accuracy']:.3f}" for c in CATEGORIES]
        print(f"| {variant} | " + " | ".join(cells) + f" | {r['compositional_accuracy']:.3f} / "
              f"{r['pixel_compositional_accuracy']:.3f} | {seconds:.3f} |", flush=True)
        failures[variant] = (r["failures"], r["pixel_failures"])
    # How the two-object prompts fail under each variant (a composed picture that holds one object: "missing object").
    kinds = [k for k in FAILURE_KINDS if k != "correct"]
    print("\n| variant | category | " + " | ".join(kinds) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in kinds) + " |")
    for variant, (learned, pixel) in failures.items():
        for cat in ("relation", "and"):
            cells = [f"{learned[cat].get(k, 0)} / {pixel[cat].get(k, 0)}" for k in kinds]
            print(f"| {variant} | {cat} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
