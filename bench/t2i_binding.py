"""Where a trained base stage takes colour-shape binding from: the caption's token states or its pooled embedding.

    python bench/t2i_binding.py --run RUN [--n 100] [--steps 25] [--guidance 3]

A stage sees each caption twice: its token states (cross-attention) and one pooled vector (added to the timestep
embedding). Both carry the binding (a linear probe reads which colour goes with which shape from a shape word's
state 0.99 of the time and from the mean-pooled vector 0.88: bench/t2i_text_probe.py); this bench asks which of
the two a trained stage takes it from. It takes the "and" prompts whose two objects differ in colour and in
shape, builds each one's swapped caption (shapes exchanged), and samples the base stage with the token states of
one caption and the pooled vector of the other (or none). The pixel check reads every picture; the table gives how
often it shows the true caption's scene and how often the swapped one's. Inference only: measured on a trained
run, nothing is trained.
"""

from __future__ import annotations

import argparse
import subprocess

import torch

from imagen.data.image_files import resize_uint8, to_uint8
from imagen.data.shapes_text import objects_phrase
from imagen.eval.pixel_check import PixelChecker
from imagen.eval.t2i import compositional_prompts, score_scene
from imagen.pipelines import SamplingConfig, TextToImagePipeline


def swapped(prompt: dict) -> tuple[str, dict]:
    """The caption with the two objects' shapes exchanged, and its expected scene."""
    a, b = prompt["expected"]["objects"]
    a2, b2 = dict(a, shape=b["shape"]), dict(b, shape=a["shape"])
    return objects_phrase([a2, b2], "en"), dict(prompt["expected"], objects=[a2, b2])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a trained text-to-image run (its base stage is sampled)")
    p.add_argument("--n", type=int, default=100, help="'and' prompts with two colours and two shapes")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=3.0)
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    pool = [q for q in compositional_prompts(4 * args.n) if q["category"] == "and"]
    prompts = [q for q in pool if len({o["color"] for o in q["expected"]["objects"]}) == 2
               and len({o["shape"] for o in q["expected"]["objects"]}) == 2][:args.n]
    swap = {q["prompt"]: swapped(q) for q in prompts}
    pipe = TextToImagePipeline.from_run(args.run, stages=["base"])
    stage = pipe.stages[0]
    encode = stage.encode_text
    checker = PixelChecker()
    config = SamplingConfig(steps=args.steps, guidance=args.guidance)
    conditions = {  # (token states from, pooled vector from)
        "true tokens, true pooled (as sampled)": ("true", "true"),
        "true tokens, swapped pooled": ("true", "swapped"),
        "true tokens, no pooled vector (zero)": ("true", None),
        "swapped tokens, true pooled": ("swapped", "true"),
    }
    print(f"{len(prompts)} prompts, base stage of {args.run}, {args.steps} steps, guidance {args.guidance:g}, commit {commit}")
    print("| condition | shows the true caption's scene | shows the swapped caption's scene |")
    print("| --- | --- | --- |")
    for name, (states_from, pooled_from) in conditions.items():
        def pick(texts, source):
            return [swap[t][0] if source == "swapped" and t in swap else t for t in texts]

        def mixed(texts, states_from=states_from, pooled_from=pooled_from):
            cond = encode(pick(texts, states_from))
            if pooled_from is None:
                cond["text_embed"] = torch.zeros_like(cond["text_embed"])
            else:
                cond["text_embed"] = encode(pick(texts, pooled_from))["text_embed"]
            return cond

        stage.encode_text = mixed
        try:
            images = resize_uint8(to_uint8(pipe.generate([q["prompt"] for q in prompts], config, stop_at="base")), 32)
        finally:
            stage.encode_text = encode
        scenes = checker.predict(images)
        true = sum(score_scene(q["expected"], s)["correct"] for q, s in zip(prompts, scenes)) / len(prompts)
        other = sum(score_scene(swap[q["prompt"]][1], s)["correct"] for q, s in zip(prompts, scenes)) / len(prompts)
        print(f"| {name} | {true:.3f} | {other:.3f} |", flush=True)


if __name__ == "__main__":
    main()
