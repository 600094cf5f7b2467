"""Training images/s of the text-to-image recipe's base stage through the real trainer, per batch size and compile mode.

    python bench/t2i_train_speed.py [--device cuda] [--batch-sizes 32,256] [--compile off,default,reduce-overhead]
                                    [--steps 300] [--text-encoder minilm] [--profile PATH]

Each row trains the recipe's base stage (`imagen train-t2i --stage base`, Shapes, 16x16, batch B, bf16 on CUDA) for
--steps optimiser steps in a fresh run directory, exactly as the CLI does (data, EMA, clipping, logging), and reads
images/s from the run's metrics.jsonl: the mean of the log windows in the second half of the run, so compile time and
warm-up are left out; "first window" is the seconds the first log window took (compilation shows there). With
--profile, a torch.profiler table of a short eager run (batch 32) is written to PATH: where the host's time goes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch

from imagen.tasks.text_to_image import train_t2i
from imagen.train.device import cpu_name

LOG_EVERY = 25


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (host: {cpu_name()})"
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def train(out: Path, device: str, batch_size: int, compile_mode: str, steps: int, text_encoder: str) -> tuple[float, float, float]:
    """(images/s over the second half, seconds of the first log window, wall seconds of the whole call)."""
    start = time.perf_counter()
    train_t2i("shapes", out, stage="base", text_encoder=text_encoder, max_steps=steps, sample_every=10**9,
              batch_size=batch_size, device=device, compile=compile_mode, log_every=LOG_EVERY, report_to=("jsonl",),
              progress=False, warmup_steps=min(100, steps // 2))
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "base" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("split") == "train" and "samples_per_s" in r]
    late = [r["samples_per_s"] for r in rows if r["step"] > steps // 2]
    first = LOG_EVERY * batch_size / rows[0]["samples_per_s"]
    return sum(late) / len(late), first, wall


def profile(out: Path, device: str, text_encoder: str, path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities) as prof:
        train_t2i("shapes", out, stage="base", text_encoder=text_encoder, max_steps=60, sample_every=10**9,
                  batch_size=32, device=device, log_every=LOG_EVERY, report_to=("jsonl",), progress=False,
                  warmup_steps=10)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    path.write_text(table)
    print(f"profile of 60 eager steps (batch 32, run setup included) -> {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-sizes", default="32,256")
    p.add_argument("--compile", default="off,default,reduce-overhead", help="comma list of compile modes")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--text-encoder", default="minilm")
    p.add_argument("--profile", type=Path, default=None)
    args = p.parse_args()
    if args.steps < 4 * LOG_EVERY:  # the second half must hold whole log windows
        p.error(f"--steps {args.steps}: use at least {4 * LOG_EVERY} (images/s is read from {LOG_EVERY}-step log windows)")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    modes = [m.strip() for m in args.compile.split(",") if m.strip()]
    print(f"device: {device_name(args.device)}; torch {torch.__version__}; {args.steps} steps per row")
    print("| batch | compile | images/s (second half) | first window (s) | wall (s) |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        if args.profile is not None:
            profile(Path(tmp) / "profile", args.device, args.text_encoder, args.profile)
        for batch in batches:
            for mode in modes:
                out = Path(tmp) / f"b{batch}-{mode}"
                try:
                    rate, first, wall = train(out, args.device, batch, mode, args.steps, args.text_encoder)
                except Exception as e:  # noqa: BLE001 - one failing mode must not hide the other rows
                    traceback.print_exc()
                    print(f"| {batch} | {mode} | failed: {type(e).__name__}: {str(e).splitlines()[0][:200]} | | |", flush=True)
                    continue
                print(f"| {batch} | {mode} | {rate:.0f} | {first:.1f} | {wall:.0f} |", flush=True)


if __name__ == "__main__":
    main()
