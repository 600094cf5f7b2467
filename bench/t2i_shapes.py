"""Text-to-image on the Shapes world: the default recipe's compositional accuracy, FID and wall time, and a
quality-vs-steps table per sampler (DPM-Solver++(2M) at 20 steps against ancestral DDPM at 250 steps).

    python bench/t2i_shapes.py [--max-steps N] [--sr-max-steps N] [--out runs/bench-t2i] [--samplers]
    python bench/t2i_shapes.py --run runs/bench-t2i --samplers      # only the sampler table, on a trained run
    python bench/t2i_shapes.py --run runs/bench-t2i --guidance-sweep 1,2,3,5,8   # accuracy and FID per guidance scale
    python bench/t2i_shapes.py --run runs/bench-t2i --readers   # per category: the learned evaluator beside the pixel check

Every row is scored twice: by the learned Shapes evaluator and by the non-learned pixel check (imagen.eval.pixel_check).
Targets: single objects >= 0.95, two objects with a relation >= 0.80, counts >= 0.85, two objects joined by "and"
>= 0.85 (<= 30 CPU-minutes of training); DPM-Solver++(2M) at 20 steps within 3 points of DDPM at 250 steps and
>= 10x faster. A run whose super-resolution stage is not trained is scored on its base stage (upscaled to 32 px).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

from imagen.config import DEFAULT_GUIDANCE
from imagen.eval.t2i import CATEGORIES, FAILURE_KINDS
from imagen.pipelines import SamplingConfig, evaluate_t2i
from imagen.tasks.text_to_image import train_t2i


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="evaluate this trained run instead of training one")
    p.add_argument("--out", default="runs/bench-t2i")
    p.add_argument("--max-steps", type=int, default=None, help="base stage steps (default: the recipe's)")
    p.add_argument("--sr-max-steps", type=int, default=None, help="super-resolution steps (default: the recipe's)")
    p.add_argument("--n", type=int, default=None, help="training images (default: the built-in Shapes train split)")
    p.add_argument("--data", default="shapes", help="training data: shapes, or shapes:compositional (default: shapes)")
    # 200 held-out prompts per category: with 50, the same run's relation accuracy moved by about +-0.07.
    p.add_argument("--n-per-category", type=int, default=200)
    p.add_argument("--samplers", action="store_true", help="also print the quality-vs-steps table per sampler")
    p.add_argument("--readers", action="store_true", help="also print each category's accuracy by both readers")
    p.add_argument("--sampler-n-per-category", type=int, default=50, help="prompts per category for the sampler table (DDPM at 250 steps is slow)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--guidance-sweep", default=None, help="comma-separated guidance scales: one table row each")
    p.add_argument("--text-encoder", default=None, help="train with this text encoder (default: the recipe's)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    quiet = lambda *a, **k: None  # noqa: E731

    run = args.run
    if run is None:
        run = args.out
        shutil.rmtree(run, ignore_errors=True)
        start = time.time()
        extra = {"text_encoder": args.text_encoder} if args.text_encoder else {}
        train_t2i(args.data, run, max_steps=args.max_steps, sr_max_steps=args.sr_max_steps, n=args.n, progress=False, device=args.device, **extra)
        minutes = (time.time() - start) / 60
        r = evaluate_t2i(run, "shapes", SamplingConfig(guidance=args.guidance), n_per_category=args.n_per_category, device=args.device, echo=quiet)
        steps = "+".join(str(json.loads((Path(run) / name / "config.json").read_text())["train"]["max_steps"]) for name in ("base", "sr1"))
        print(f"| {args.data} default recipe ({steps} steps, {minutes:.1f} min training) | "
              f"compositional {r['compositional_accuracy']:.3f}, single {r['single_accuracy']:.3f}, relation {r['relation_accuracy']:.3f}, "
              f"count {r['count_accuracy']:.3f}, and {r['and_accuracy']:.3f}, position {r['position_accuracy']:.3f}, FID {r['fid']:.2f}; "
              f"pixel check: relation {r['pixel_relation_accuracy']:.3f}, count {r['pixel_count_accuracy']:.3f}, "
              f"and {r['pixel_and_accuracy']:.3f} ({args.n_per_category} prompts per category) | {commit} |", flush=True)
        if args.readers:
            print_readers(r)
    elif args.readers:
        print_readers(evaluate_t2i(run, "shapes", SamplingConfig(guidance=args.guidance), n_per_category=args.n_per_category,
                                   device=args.device, echo=quiet))
    if args.guidance_sweep:
        print("| guidance | compositional | single | relation | count | position | FID |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for g in (float(v) for v in args.guidance_sweep.split(",")):
            r = evaluate_t2i(run, "shapes", SamplingConfig(guidance=g), n_per_category=args.n_per_category, device=args.device, echo=quiet)
            print(f"| {g:g} | {r['compositional_accuracy']:.3f} | {r['single_accuracy']:.3f} | {r['relation_accuracy']:.3f} "
                  f"| {r['count_accuracy']:.3f} | {r['position_accuracy']:.3f} | {r['fid']:.2f} |", flush=True)
    if args.samplers:
        print("| sampler | steps | compositional | single | relation | count | seconds |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for sampler, steps in (("ddpm", 250), ("ddpm", 50), ("ddim", 50), ("ddim", 20), ("dpmpp2m", 20), ("dpmpp2m", 10)):
            start = time.time()
            r = evaluate_t2i(run, "shapes", SamplingConfig(sampler=sampler, steps=steps, guidance=args.guidance),
                             n_per_category=args.sampler_n_per_category, fid_samples=16, device=args.device, echo=quiet)
            print(f"| {sampler} | {steps} | {r['compositional_accuracy']:.3f} | {r['single_accuracy']:.3f} | {r['relation_accuracy']:.3f} "
                  f"| {r['count_accuracy']:.3f} | {time.time() - start:.1f} |", flush=True)


READER_ROWS = (("single", "single_accuracy"), ("relation", "relation_accuracy"), ("count", "count_accuracy"),
               ("and", "and_accuracy"), ("all prompts", "compositional_accuracy"), ("colour check", "color_accuracy"),
               ("shape check", "shape_accuracy"), ("position check", "position_accuracy"),
               ("count check", "count_check_accuracy"), ("relation check", "relation_check_accuracy"))


def print_readers(r: dict) -> None:
    """One evaluation's figures by the learned evaluator and by the pixel check, side by side."""
    plan = ", ".join(f"{s['stage']}: {s['sampler']} {s['steps']} steps, {s['unet_calls']} U-Net calls" for s in r["stages"])
    print(f"sampling per image: {plan}; guidance {r['guidance']:g}; {r['n'] // 4} prompts per category")
    print("| | learned evaluator | pixel check |")
    print("| --- | --- | --- |")
    for name, key in READER_ROWS:
        print(f"| {name} | {r[key]:.3f} | {r['pixel_' + key]:.3f} |")
    print(f"| readers agree (correct or not) | {r['pixel_agreement']:.3f} | |", flush=True)
    kinds = [k for k in FAILURE_KINDS if k != "correct"]
    print("\nHow the pictures fail (prompts per failure kind; learned evaluator / pixel check):\n")
    print("| category | " + " | ".join(kinds) + " |")
    print("| --- | " + " | ".join("---" for _ in kinds) + " |")
    for cat in CATEGORIES:
        cells = [f"{r['failures'][cat].get(k, 0)} / {r['pixel_failures'][cat].get(k, 0)}" for k in kinds]
        print(f"| {cat} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
