"""Text-to-image on Emoji with the frozen MiniLM text encoder: FID and CLIPScore-style alignment, with references.

    python bench/t2i_emoji.py --align-run RUN [--run T2I_RUN | --max-steps 3000 --sr-max-steps 2000]

Trains (unless --run is given) `imagen train-t2i --data emoji` with the default text encoder (frozen
all-MiniLM-L6-v2), then for captions of the training split (emoji the model saw) and of the test split (emoji it
never saw: their names are new) prints FID against the real pictures and alignment, next to the alignment of the
real pictures with their own captions (what a perfect generator would score) and of the real pictures with
shuffled captions (what an unrelated picture scores). Alignment needs a contrastive pretraining run on Emoji
(`imagen pretrain --data emoji --out ALIGN`). A grid of training-caption samples is written to RUN/eval/.
FID uses the Shapes evaluator's features (the project's own network; no Inception weights exist offline), so
only differences between rows mean much.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from pathlib import Path

import torch

from imagen.data import load_dataset
from imagen.eval.evaluator import get_evaluator
from imagen.eval.t2i import alignment_score, fid
from imagen.config import DEFAULT_GUIDANCE
from imagen.data.image_files import save_grid, to_uint8
from imagen.pipelines import SamplingConfig, TextToImagePipeline
from imagen.tasks.loading import load
from imagen.tasks.text_to_image import train_t2i


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="evaluate this trained run instead of training one")
    p.add_argument("--out", default="runs/bench-t2i-emoji")
    p.add_argument("--align-run", required=True, help="an `imagen pretrain --data emoji` run (its ITC heads)")
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--sr-max-steps", type=int, default=2000)
    p.add_argument("--n", type=int, default=500, help="captions per split")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    run = args.run
    if run is None:
        run = args.out
        shutil.rmtree(run, ignore_errors=True)
        start = time.time()
        train_t2i("emoji", run, max_steps=args.max_steps, sr_max_steps=args.sr_max_steps, progress=False)
        print(f"trained {run} in {(time.time() - start) / 60:.1f} min ({args.max_steps}+{args.sr_max_steps} steps)")
    pipe = TextToImagePipeline.from_run(run)
    sampling = SamplingConfig(guidance=args.guidance)
    aligner = load(args.align_run)
    evaluator = get_evaluator(32)
    seed = pipe.config["data"].get("seed", 0)
    print("| captions | n | FID | alignment | real-image alignment | shuffled-caption alignment | commit |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for split in ("train", "test"):
        data = load_dataset("emoji", split, seed=seed)
        texts = [t or "" for t in data.texts()][:args.n]
        real = data.fast_images(pipe.image_size)[:len(texts)]
        fake = torch.cat([to_uint8(pipe.generate(texts[i:i + 64], sampling))
                          for i in range(0, len(texts), 64)])
        shuffled = texts[1:] + texts[:1]
        row = (fid(real, fake, evaluator), alignment_score(fake, texts, aligner), alignment_score(real, texts, aligner),
               alignment_score(real, shuffled, aligner))
        print(f"| {split} | {len(texts)} | {row[0]:.2f} | {row[1]:.2f} | {row[2]:.2f} | {row[3]:.2f} | {commit} |", flush=True)
        if split == "train":
            out = Path(run) / "eval"
            save_grid(torch.cat([real[:16], fake[:16]]), out / "emoji-train-real-vs-generated.png", nrow=16)
            (out / "emoji-train-captions.txt").write_text("\n".join(texts[:16]) + "\n")


if __name__ == "__main__":
    main()
