"""A 12-trial `imagen tune` search for classify on a Fashion-MNIST subset: the best trial vs the default recipe.

    python bench/tune_fashion_mnist.py [--trials 12] [--n 6000] [--max-steps 400] [--preset tiny]
                                       [--out runs/bench-tune-fm]

Every trial and the default run train the same number of steps on the same subset, validate every quarter of the
run, and are scored on the test split; the search's minutes are wall-clock for all trials. Prints a markdown table
for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import imagen
from imagen.tune import TuneSettings, tune

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--n", type=int, default=6000, help="training images of the subset")
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--out", default="runs/bench-tune-fm")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    fixed = dict(n=args.n, max_steps=args.max_steps, eval_every=max(1, args.max_steps // 4), preset=args.preset,
                 progress=False, report_to=("jsonl",))

    start = time.perf_counter()
    imagen.finetune(task="classify", data=args.data, out=out / "default", **fixed)
    default_minutes = (time.perf_counter() - start) / 60
    default = imagen.evaluate(out / "default", split="test", echo=lambda *a, **k: None)

    start = time.perf_counter()
    result = tune(TuneSettings(task="classify", data=args.data, out=out / "search", trials=args.trials, fixed=fixed))
    search_minutes = (time.perf_counter() - start) / 60
    best = imagen.evaluate(out / "search" / "best", split="test", echo=lambda *a, **k: None)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"\ncommit {commit}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.data} "
          f"subset of {args.n}, {args.max_steps} steps per run, preset {args.preset}")
    print("| run | val accuracy | test accuracy | minutes |")
    print("| --- | --- | --- | --- |")
    default_val = json.loads((out / "default" / "checkpoints" / "best" / "best.json").read_text())["value"]
    print(f"| default recipe | {default_val:.4f} | {default['accuracy']:.4f} | {default_minutes:.1f} |")
    print(f"| best of {args.trials} trials (trial {result.best_trial}) | {result.best_value:.4f} | {best['accuracy']:.4f} | "
          f"{search_minutes:.1f} (all trials) |")
    print("best parameters: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in result.best_params.items()))


if __name__ == "__main__":
    main()
