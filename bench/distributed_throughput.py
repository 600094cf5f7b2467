"""Training throughput of 1 process vs N processes (torch.distributed, `imagen finetune --nproc N`) on this machine.

    python bench/distributed_throughput.py [--nproc 2] [--steps 200] [--batch-size 64] [--preset small]
                                           [--device cpu] [--threads 1]
    python bench/distributed_throughput.py --task t2i [--steps 300] [--batch-size 32]

Each configuration trains the same run for --steps optimiser steps: a classify run (Shapes, colour-shape labels, fp32)
or, with --task t2i, the text-to-image base stage (`imagen train-t2i --data shapes --sizes 16`, its precision
chosen by the toolkit), at the same global batch; the figure is the mean of the samples/s that rank 0 logs for the
whole job (every process's samples), without the first log window (start-up). Both use the same cores: N processes
with --threads intra-op threads each, against one process with N x --threads threads. Prints a markdown table for bench/RESULTS.md. On CPU
gloo's all-reduce of the gradients is part of every step; nothing here is hidden from it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from imagen.train.device import cpu_name

ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, threads: int, args, out: Path) -> float:
    """Samples per second of one training job with `nproc` processes."""
    common = ["--n", str(args.n), "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
              "--device", args.device, "--no-progress", "--report-to", "jsonl", "--out", str(out)]
    if args.task == "t2i":
        command = [sys.executable, "-m", "imagen", "train-t2i", "--data", "shapes", "--sizes", "16", *common]
        out = out / "base"  # the stage's run directory holds its metrics
    else:
        command = [sys.executable, "-m", "imagen", "finetune", "--task", "classify", "--data", "shapes", "--label", "color-shape",
                   "--preset", args.preset, "--precision", "fp32", "--set", "train.log_every=10", *common]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{nproc} process(es) failed:\n{done.stderr}")
    rates = [r["samples_per_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train" and r.get("samples_per_s")]
    rates = rates[1:] or rates  # the first window holds the start-up
    return sum(rates) / len(rates)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("classify", "t2i"), default="classify")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: 200 classify, 300 t2i)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch, split over the processes (default: 64 "
                   "classify, 32 t2i: the recipe's)")
    p.add_argument("--n", type=int, default=4000, help="training images")
    p.add_argument("--preset", default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process of the N-process job")
    args = p.parse_args()
    args.steps = args.steps or (300 if args.task == "t2i" else 200)
    args.batch_size = args.batch_size or (32 if args.task == "t2i" else 64)
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args.threads * args.nproc, args, Path(tmp) / "one")
        many = run(args.nproc, args.threads, args, Path(tmp) / "many")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}, {cpu_name()}, {os.cpu_count()} cores, device {args.device}, "
          f"{'t2i base stage' if args.task == 't2i' else 'classify, preset ' + args.preset}, global batch {args.batch_size}, {args.steps} steps")
    print("| processes x threads | samples/s | vs 1 process |")
    print("| --- | --- | --- |")
    print(f"| 1 x {args.threads * args.nproc} | {one:.0f} | 1.00 |")
    print(f"| {args.nproc} x {args.threads} | {many:.0f} | {many / one:.2f} |")


if __name__ == "__main__":
    main()
