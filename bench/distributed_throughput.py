"""Training throughput of 1 process vs N processes (torch.distributed, `imagen finetune --nproc N`) on this machine.

    python bench/distributed_throughput.py [--nproc 2] [--steps 200] [--batch-size 64] [--preset small]
                                           [--device cpu] [--threads 1]

Each configuration trains the same classify run (Shapes, colour-shape labels, the same global batch) for --steps
optimiser steps; the figure is the mean of the samples/s that rank 0 logs for the whole job (every process's
samples), without the first log window (start-up). Both use the same cores: N processes with --threads intra-op
threads each, against one process with N x --threads threads. Prints a markdown table for bench/RESULTS.md. On CPU
gloo's all-reduce of the gradients is part of every step; nothing here is hidden from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, threads: int, args, out: Path) -> float:
    """Samples per second of one training job with `nproc` processes."""
    command = [sys.executable, "-m", "imagen", "finetune", "--task", "classify", "--data", "shapes", "--label", "color-shape",
               "--n", str(args.n), "--preset", args.preset, "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
               "--device", args.device, "--precision", "fp32", "--no-progress", "--report-to", "jsonl",
               "--set", "train.log_every=10", "--out", str(out)]
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
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split over the processes)")
    p.add_argument("--n", type=int, default=4000, help="training images")
    p.add_argument("--preset", default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process of the N-process job")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args.threads * args.nproc, args, Path(tmp) / "one")
        many = run(args.nproc, args.threads, args, Path(tmp) / "many")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, device {args.device}, "
          f"preset {args.preset}, global batch {args.batch_size}, {args.steps} steps")
    print("| processes x threads | samples/s | vs 1 process |")
    print("| --- | --- | --- |")
    print(f"| 1 x {args.threads * args.nproc} | {one:.0f} | 1.00 |")
    print(f"| {args.nproc} x {args.threads} | {many:.0f} | {many / one:.2f} |")


if __name__ == "__main__":
    main()
