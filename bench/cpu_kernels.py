"""Which precision, attention kernel and layout train fastest on this machine, and is `precision auto` right here?

    python bench/cpu_kernels.py [--rounds 12] [--models t2i-base,classify] [--variants ...]

Prints the CPU (model, family, the flags that decide bf16 speed), its measured matrix-product peak in fp32 and bf16
(2048 x 2048 products), then for each model one training step (forward + backward + AdamW) in each variant:

    fp32              fp32, PyTorch's fused attention kernel (what `imagen.models.layers.attention` runs in fp32)
    fp32-matmul-attn  fp32, attention written out as two matrix products
    fp32-channels-last, fp32-fused-adamw   layout / optimiser variants
    fp32-channels-last-fused-adamw         both (what the toolkit trains in fp32 on a CPU without native bf16)
    bf16              bf16 autocast, attention as matrix products
    bf16-fused-attn   bf16 autocast, the fused attention kernel
    bf16-channels-last, bf16-fused-adamw   layout / optimiser variants in bf16 (the second is the toolkit's bf16)

The toolkit's own choice on the machine at hand (`precision auto`, fused AdamW, and channels-last weights where
`imagen.train.device.channels_last_pays`) is named under each table.

Variants run round-robin, one step each per round, and the median step time is reported, so noise from the
machine hits every variant alike; compare rows within one run. Each row also gives the achieved FLOP/s of the step
(FLOPs counted by torch.utils.flop_counter) as a share of the measured peak of its precision. Models: `t2i-base` is
the base stage of `imagen train-t2i --data shapes` (16x16, batch 32, 32 text tokens of width 384); `classify` is
the encoder of `imagen finetune --task classify --data fashion-mnist` (28 px, batch 128); `t2i-sample` is the base
U-Net's forward pass as sampling runs it (eval, no gradients, batch 32 = 16 prompts x the two guidance branches). Where bf16 is emulated
(no AVX512-BF16 or AMX), its steps take seconds: they run for fewer rounds (`--slow-rounds`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import imagen.models.layers as layers
from imagen.config import encoder_config
from imagen.models.heads import EncoderForClassification
from imagen.models.unet import EfficientUNet
from imagen.tasks.classify import RECIPE_MODEL
from imagen.tasks.text_to_image.training import default_stages
from imagen.train.device import channels_last_pays, cpu_flags, cpu_has_fast_bf16, cpu_name, resolve_precision

FUSED_ATTENTION = layers.attention
VARIANTS = ("fp32", "fp32-matmul-attn", "fp32-channels-last", "fp32-fused-adamw", "fp32-channels-last-fused-adamw",
            "bf16", "bf16-fused-attn", "bf16-channels-last", "bf16-fused-adamw")


def cpu_description() -> str:
    flags = cpu_flags()
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return (f"{cpu_name()}; flags: {' '.join(shown) or 'none of avx2/avx512/amx'}; "
            f"torch capability {torch.backends.cpu.get_cpu_capability()}; {torch.get_num_threads()} threads")


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Measured FLOP/s of an n x n matrix product in `dtype` (best of `reps`)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def t2i_base():
    unet = EfficientUNet(default_stages([16, 32])[0].unet)
    B, c = 32, unet.config
    x = torch.randn(B, 3, c.image_size, c.image_size)
    t = torch.randint(0, 1000, (B,))
    text, mask = torch.randn(B, 32, c.text_dim), torch.ones(B, 32, dtype=torch.bool)
    return unet, B, x, lambda m, xx: (m(xx, t, text_states=text, text_mask=mask).float() - x).pow(2).mean()


def classify():
    cfg = encoder_config(image_size=28, patch_size=4, **RECIPE_MODEL)
    model = EncoderForClassification(cfg, 10, label_smoothing=0.1)
    B = 128
    x, y = torch.randn(B, 3, 28, 28), torch.randint(0, 10, (B,))
    return model, B, x, lambda m, xx: m(images=xx, labels=y).loss


def t2i_sample():
    """The base U-Net as sampling runs it: eval mode, no gradients, 16 prompts x 2 guidance branches."""
    unet, B, x, loss_of = t2i_base()
    return unet.eval(), B, x, loss_of


MODELS = {"t2i-base": t2i_base, "classify": classify, "t2i-sample": t2i_sample}
SAMPLING = {"t2i-sample"}  # one forward without gradients, no optimiser step (the AdamW variants change nothing)


def make_step(name: str, variant: str):
    """(step, batch, flops per step) for one variant: its own model and optimiser from the same seed."""
    torch.manual_seed(0)
    model, batch, x, loss_of = MODELS[name]()
    if "channels-last" in variant:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused="fused-adamw" in variant)
    bf16 = variant.startswith("bf16")
    # fp32 runs the fused kernel and bf16 the matrix products (as `layers.attention` does), unless the variant says.
    fused = variant == "bf16-fused-attn" or (not bf16 and variant != "fp32-matmul-attn")
    kernel = FUSED_ATTENTION if fused else layers.matmul_attention

    def step():
        layers.attention = kernel
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(name not in SAMPLING):
                loss = loss_of(model, x)
            if name in SAMPLING:
                return
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            layers.attention = FUSED_ATTENTION

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return step, batch, counter.get_total_flops()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=12, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--slow-rounds", type=int, default=1, help="timed steps for bf16 where it is emulated")
    args = p.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS)) + sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown variant or model: {', '.join(unknown)}; choose from {VARIANTS} and {tuple(MODELS)}")
    fast_bf16 = cpu_has_fast_bf16()
    print(f"CPU: {cpu_description()}")
    # Emulated bf16 multiplies at well under 1 GFLOP/s: a smaller product measures it in seconds, not minutes.
    peak = {"fp32": matmul_peak(torch.float32),
            "bf16": matmul_peak(torch.bfloat16, *((2048, 5) if fast_bf16 else (512, 2)))}
    print(f"matrix-product peak: fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s; "
          f"fast bf16: {'yes' if fast_bf16 else 'no (emulated)'}")
    for name in args.models.split(","):
        steps = {v: make_step(name, v) for v in variants}
        params = sum(p.numel() for p in MODELS[name]()[0].parameters())
        auto = resolve_precision("auto", torch.device("cpu"), params)
        times: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.rounds + 1):
            for v, (step, _, _) in steps.items():
                if v.startswith("bf16") and not fast_bf16 and r > args.slow_rounds:
                    continue
                start = time.perf_counter()
                step()
                times[v].append(time.perf_counter() - start)
        print(f"\n{name}: {params / 1e6:.2f}M parameters; `precision auto` picks {auto} here")
        print("| variant | images/s | vs fp32 | GFLOP/s achieved | share of matmul peak |")
        print("| --- | --- | --- | --- | --- |")
        speed = {v: steps[v][1] / statistics.median(ts[1:]) for v, ts in times.items()}
        for v in variants:
            seconds = steps[v][1] / speed[v]
            achieved = steps[v][2] / seconds
            ref = speed.get("fp32")
            versus = f"{speed[v] / ref:.2f}x" if ref else "-"
            # emulated bf16 has no meaningful peak: its products run through fp32 conversions
            share = "-" if v.startswith("bf16") and not fast_bf16 else \
                f"{achieved / peak['bf16' if v.startswith('bf16') else 'fp32']:.1%}"
            print(f"| {v} | {speed[v]:.1f} | {versus} | {achieved / 1e9:.1f} | {share} |")
        fastest = max(speed, key=speed.get)
        layout = "-channels-last" if channels_last_pays(torch.device("cpu"), auto) else ""
        # sampling (`TextToImagePipeline`) keeps the weights' default layout
        chosen = auto if name in SAMPLING else next((v for v in (f"{auto}{layout}-fused-adamw", auto) if v in speed), auto)
        print(f"fastest here: {fastest}; the toolkit's choice ({chosen}) runs at {speed.get(chosen, float('nan')):.1f} "
              f"images/s ({speed.get(chosen, float('nan')) / speed[fastest]:.0%} of the fastest)", flush=True)


if __name__ == "__main__":
    main()
