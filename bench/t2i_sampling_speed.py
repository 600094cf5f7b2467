"""Seconds per picture of a text-to-image run's cascade on this CPU, with the U-Nets' weights in each memory layout.

    python bench/t2i_sampling_speed.py --run RUN [--prompts 16] [--rounds 5] [--steps 25] [--guidance 3]

Loads RUN as `imagen generate` does (`TextToImagePipeline.from_run`, which keeps convolution weights channels-last
where `imagen.train.device.channels_last_pays` says so), then times `generate` on the same prompts with the weights
in the default layout and channels-last, alternating one round of each so that noise from the machine hits both
alike; prints the median seconds per picture of each and how far the two layouts' pictures differ.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from imagen.cli import _sampling_steps
from imagen.diffusion import SamplingConfig
from imagen.pipelines import TextToImagePipeline
from imagen.train.device import channels_last_pays, cpu_name

PROMPTS = ["a red circle above a blue square", "two green triangles", "a yellow square and a purple circle",
           "a blue circle to the left of a red triangle"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=_sampling_steps, default=(None, {}), help="sampling steps, N or STAGE=N,... as "
                   "`imagen generate` takes them (default: the toolkit's)")
    p.add_argument("--guidance", type=float, default=3.0)
    args = p.parse_args()
    pipe = TextToImagePipeline.from_run(args.run)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    steps, stage_steps = args.steps
    config = SamplingConfig(guidance=args.guidance, seed=0, stage_steps=stage_steps, **({"steps": steps} if steps else {}))
    layouts = {"default": torch.contiguous_format, "channels-last": torch.channels_last}
    times: dict[str, list[float]] = {name: [] for name in layouts}
    images = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, fmt in layouts.items():
            for stage in pipe.stages:
                stage.to(memory_format=fmt)
            start = time.perf_counter()
            images[name] = pipe.generate(prompts, config)
            if r:
                times[name].append((time.perf_counter() - start) / len(prompts))
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; run {args.run}; {len(prompts)} prompts, "
          f"{args.rounds} rounds; the toolkit samples channels-last here: "
          f"{'yes' if channels_last_pays(torch.device('cpu'), 'fp32') else 'no'}")
    print("| weights | s / picture (median) |")
    print("| --- | --- |")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} |")
    ratio = statistics.median(times["default"]) / statistics.median(times["channels-last"])
    diff = (images["default"] - images["channels-last"]).abs().max().item()
    print(f"channels-last is {ratio:.2f}x the default layout's speed; largest pixel difference {diff:.2e} (in [-1, 1])")


if __name__ == "__main__":
    main()
