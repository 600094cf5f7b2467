"""Training throughput (images/s) and peak memory of the encoder, fp32 vs bf16 autocast, per preset.

    python bench/throughput.py [--presets tiny small base] [--batch-size 64] [--image-size 32] [--steps 10]

Each configuration runs in its own process so peak memory (max RSS on CPU, max allocated on CUDA) is its own.
Measures one optimiser step of EncoderForClassification (forward, backward, AdamW) on random data.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def measure(preset: str, precision: str, batch_size: int, image_size: int, steps: int, device: str) -> dict:
    import resource

    import torch

    from imagen.config import encoder_config
    from imagen.models import EncoderForClassification
    from imagen.train import autocast_context, resolve_device

    torch.manual_seed(0)
    dev = resolve_device(device)
    cfg = encoder_config(preset, image_size=image_size)
    model = EncoderForClassification(cfg, num_classes=10).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch_size, 3, image_size, image_size, device=dev)
    y = torch.randint(0, 10, (batch_size,), device=dev)

    def step():
        with autocast_context(dev, precision):
            loss = model(images=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: allocator, kernels
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "preset": preset, "precision": precision, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "images_per_s": steps * batch_size / elapsed, "peak_mem_mb": peak, "device": str(dev),
        "threads": torch.get_num_threads(),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", nargs=2, metavar=("PRESET", "PRECISION"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.batch_size, args.image_size, args.steps, args.device)))
        return
    print("| preset | params (M) | precision | images/s | peak memory (MB) | device |")
    print("| --- | --- | --- | --- | --- | --- |")
    for preset in args.presets:
        for precision in args.precisions:
            cmd = [sys.executable, __file__, "--child", preset, precision, "--batch-size", str(args.batch_size),
                   "--image-size", str(args.image_size), "--steps", str(args.steps), "--device", args.device]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            print(f"| {r['preset']} | {r['params_m']:.2f} | {r['precision']} | {r['images_per_s']:.0f} | {r['peak_mem_mb']:.0f} | {r['device']} ({r['threads']} threads) |", flush=True)


if __name__ == "__main__":
    main()
