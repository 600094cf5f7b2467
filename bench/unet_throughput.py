"""Training throughput of the Efficient U-Net at imagen-pytorch's reference size (32x32, batch 64, ~4M params).

    python bench/unet_throughput.py [--preset base32] [--batch-size 64] [--steps 6]

One step = forward + backward + AdamW on random images with 8 text tokens of width 384 (cross-attention on),
fp32 and bf16 autocast. Reference figures measured on the same kind of 2-core machine: imagen-pytorch's U-Net
(3.9M parameters) 17 images/s, diffusers' UNet2DConditionModel (1.7M) 63 images/s; the target is >= 3x 17.
`bench/unet_peers.py` times both peers at matched size beside ours in one process, which is the fairer ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from imagen.models.unet import EfficientUNet


def training_step(preset: str, batch_size: int, precision: str = "fp32"):
    """(step, model): one forward + backward + AdamW step of the preset on fixed random inputs, and its U-Net."""
    torch.manual_seed(0)
    model = EfficientUNet.from_preset(preset)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    c = model.config
    x = torch.randn(batch_size, 3, c.image_size, c.image_size)
    t = torch.randint(0, 1000, (batch_size,))
    text = torch.randn(batch_size, 8, c.text_dim)
    mask = torch.ones(batch_size, 8, dtype=torch.bool)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = (model(x, t, text_states=text, text_mask=mask).float() - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def measure(preset: str, batch_size: int, steps: int, precision: str) -> tuple[float, int]:
    step, model = training_step(preset, batch_size, precision)
    step()
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start), model.num_parameters()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="base32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    print("| U-Net | params (M) | precision | images/s | vs imagen-pytorch (17/s) |")
    print("| --- | --- | --- | --- | --- |")
    for precision in ("fp32", "bf16"):
        ips, n = measure(args.preset, args.batch_size, args.steps, precision)
        print(f"| {args.preset} | {n / 1e6:.2f} | {precision} | {ips:.1f} | {ips / 17:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
