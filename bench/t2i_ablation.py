"""Which part of the text-to-image recipe makes Shapes prompts followed: base stage only (16x16), short runs.

Trains base-only cascades (`--sizes 16`) for the same number of steps with each variant, then prints for each
compositional accuracy on the 150 held-out prompts (base images upscaled to the evaluator's 32x32, which reads
true 16x16 scenes upscaled the same way perfectly on single objects and relations) and a position probe: the
denoising loss on validation images whose caption states a position, with the true caption and with the position
words swapped (top left <-> bottom right, ...). A model that uses position words has a clearly higher loss with
the swapped caption; one that ignores them, the same loss.

    python bench/t2i_ablation.py [--steps 2500] [--variants minilm-floor,trainable-floor] [--out runs/t2i-ablation]

Variants (name: text encoder, --set overrides):
    minilm-floor     minilm,    Min-SNR-5 + SNR floor 1 (the recipe)
    minilm-minsnr    minilm,    Min-SNR-5 only
    trainable-floor  trainable, Min-SNR-5 + SNR floor 1
    trainable-minsnr trainable, Min-SNR-5 only
Two variants at a time share the 2 cores well: run them as two processes with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import time
from pathlib import Path

import torch

from imagen.data import load_dataset
from imagen.data.images import normalize_images
from imagen.diffusion.process import q_sample, v_target
from imagen.eval.evaluator import get_evaluator
from imagen.eval.t2i import compositional_accuracy, compositional_prompts
from imagen.config import DEFAULT_GUIDANCE
from imagen.data.image_files import resize_uint8, to_uint8
from imagen.pipelines import SamplingConfig, TextToImagePipeline
from imagen.tasks.text_to_image import train_t2i

VARIANTS = {
    "minilm-floor": ("minilm", ["base.snr_floor=1"]),
    "minilm-minsnr": ("minilm", ["base.snr_floor=none"]),
    "trainable-floor": ("trainable", ["base.snr_floor=1"]),
    "trainable-minsnr": ("trainable", ["base.snr_floor=none"]),
}
SWAP = {"top left": "bottom right", "bottom right": "top left", "top right": "bottom left", "bottom left": "top right",
        "at the top": "at the bottom", "at the bottom": "at the top", "on the left": "on the right",
        "on the right": "on the left"}
PROBE_STEPS = (980, 900, 800, 600)


@torch.no_grad()
def position_probe(run: Path, n: int = 128) -> dict[int, float]:
    """Per timestep: relative increase of the base stage's v-loss when the caption's position words are swapped."""
    stage = TextToImagePipeline.from_run(run).stages[0]
    unet, size = stage.ema_unet, stage.config.unet.image_size
    val = load_dataset("shapes", "val", seed=0)
    pattern = re.compile("|".join(sorted(SWAP, key=len, reverse=True)))
    idx = [i for i, t in enumerate(val.texts()) if pattern.search(t) and " and " not in t][:n]  # one positioned object
    true = [val.texts()[i] for i in idx]
    swapped = [pattern.sub(lambda m: SWAP[m.group(0)], t) for t in true]
    x0 = normalize_images(val.fast_images(size)[idx])
    out = {}
    for step in PROBE_STEPS:
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(step))
        t = torch.full((len(idx),), step)
        x_t, target = q_sample(stage.schedule, x0, t, noise), v_target(stage.schedule, x0, noise, t)
        losses = []
        for captions in (true, swapped):
            cond = stage.encode_text(captions)
            losses.append(float(((unet(x_t, t, **cond) - target) ** 2).mean()))
        out[step] = losses[1] / losses[0] - 1
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="runs/t2i-ablation")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    prompts = compositional_prompts(50, size=32)
    evaluator = get_evaluator(32)
    print("| variant | steps | minutes | compositional | single | relation | count | position | probe t=900 | commit |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        encoder, sets = VARIANTS[name]
        run = Path(args.out) / name
        shutil.rmtree(run, ignore_errors=True)
        start = time.time()
        train_t2i("shapes", run, sizes=(16,), text_encoder=encoder, max_steps=args.steps, sets=sets, progress=False)
        minutes = (time.time() - start) / 60
        pipe = TextToImagePipeline.from_run(run)
        sampling = SamplingConfig(steps=25, guidance=args.guidance)

        def generate(texts):  # as evaluate-t2i: uint8 pictures, upscaled to the evaluator's 32x32
            return resize_uint8(to_uint8(pipe.generate(texts, sampling)), 32)

        r = compositional_accuracy(generate, prompts, evaluator)
        probe = position_probe(run)
        print(f"| {name} | {args.steps} | {minutes:.1f} | {r['compositional_accuracy']:.3f} | {r['single_accuracy']:.3f} "
              f"| {r['relation_accuracy']:.3f} | {r['count_accuracy']:.3f} | {r['position_accuracy']:.3f} "
              f"| {100 * probe[900]:+.1f} % | {commit} |", flush=True)


if __name__ == "__main__":
    main()
