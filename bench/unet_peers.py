"""Training throughput of the Efficient U-Net beside imagen-pytorch's Unet and diffusers' UNet2DConditionModel.

    python bench/unet_peers.py [--warmup 2] [--steps 10] [--sets base32,base16]

All U-Nets are built in one process on one torch build, and their training steps (forward + backward + AdamW on
fixed random inputs) are timed round-robin: each round times one step of every model, in an order that rotates
from round to round, and a model's figure is the median of its per-step times after the warm-up, so machine noise
hits every model alike. Two row sets, each with the peers sized to our U-Net's parameter count (within ~10%) and
kept to its structure (3 levels, attention with text cross-attention at the two lower levels, 4 heads):

- base32: our `base32` preset, imagen-pytorch's reference size: 32x32 images, batch 64;
- base16: the U-Net that `imagen train-t2i` trains for the base stage of the default Shapes recipe (`base16`,
  16x16, batch 32).

Text conditioning everywhere: cross-attention to 8 tokens of width 384 (all visible) and, where the model takes
it, the pooled text. bf16 autocast columns are added only where the CPU multiplies bf16 natively
(imagen.train.device.cpu_has_fast_bf16); elsewhere bf16 is emulated and much slower than fp32, so it is skipped.

The peers are not dependencies of the toolkit; install them into a separate virtual environment, with this
toolkit's torch build pinned so that pip never replaces it:

    python3 -m venv /tmp/peers-venv
    /tmp/peers-venv/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/peers-constraints.txt
    /tmp/peers-venv/bin/pip install -c /tmp/peers-constraints.txt diffusers einops beartype tqdm
    /tmp/peers-venv/bin/pip install -c /tmp/peers-constraints.txt --no-deps imagen-pytorch
    /tmp/peers-venv/bin/pip install --no-deps -e .

and run (one core, one thread, as the figures in bench/RESULTS.md are measured):

    taskset -c 0 env OMP_NUM_THREADS=1 /tmp/peers-venv/bin/python bench/unet_peers.py

imagen-pytorch is installed without its dependencies: its package imports a trainer, datasets, torchvision and
kornia, and its Unet's default text width asks the Hugging Face hub for a T5 config when the module is imported.
Only its U-Net module is loaded here, with placeholders for the parts a U-Net never uses (see
`import_imagen_pytorch_unet`), so it runs offline and without torchvision. A peer that cannot be imported or
built is reported in one line and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import io
import os
import statistics
import sys
import time
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub

import torch  # noqa: E402

from imagen.models.unet import unet_preset  # noqa: E402
from imagen.train.device import cpu_has_fast_bf16  # noqa: E402
from unet_throughput import training_step  # noqa: E402

TEXT_TOKENS = 8
TEXT_DIM = 384

# Each row set: our preset (its image size is the preset's), the batch it trains at, and the peers' sizes that match
# its parameter count. Our base32 is 48/96/96 channels with (1, 2, 3) residual blocks, base16 the same widths with
# (1, 2, 2). imagen-pytorch's residual blocks are heavier (each carries global-context attention), so at our widths
# it matches with fewer of them; diffusers' up levels add one block per level, so it has fewer blocks (base32) or
# fewer channels (base16, 40/80/80).
ROW_SETS = {
    "base32": dict(batch_size=64,
                   imagen_pytorch=dict(dim=48, num_resnet_blocks=(1, 1, 2)),
                   diffusers=dict(dim=48, layers_per_block=(1, 1, 1))),
    "base16": dict(batch_size=32,
                   imagen_pytorch=dict(dim=48, num_resnet_blocks=(1, 1, 1)),
                   diffusers=dict(dim=40, layers_per_block=(1, 1, 2))),
}


@functools.cache
def import_imagen_pytorch_unet():
    """imagen-pytorch's Unet class, loaded without its package __init__, torchvision, kornia or the T5 hub lookup.

    The module imports torchvision.transforms and kornia.augmentation for the Imagen wrapper's image resizing and
    cropping, and imagen_pytorch.t5 for the T5 text encoder, whose `get_encoded_dim` (a hub lookup) sets the Unet's
    default text width; a U-Net given `text_embed_dim` uses none of them. Placeholders stand in for them while the
    module is imported and are removed afterwards.
    """
    spec = importlib.util.find_spec("imagen_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("imagen-pytorch is not installed (see the install commands in this script's docstring)")

    def t5_unavailable(*args, **kwargs):
        raise RuntimeError("the T5 text encoder is not available in this benchmark")

    package = types.ModuleType("imagen_pytorch")
    package.__path__ = list(spec.submodule_search_locations)  # submodules load from the real folder
    t5 = types.ModuleType("imagen_pytorch.t5")
    t5.DEFAULT_T5_NAME = "t5-unavailable"
    t5.get_encoded_dim = lambda name: TEXT_DIM
    t5.t5_encode_text = t5_unavailable
    placeholders = {name: types.ModuleType(name) for name in
                    ("torchvision", "torchvision.transforms", "kornia", "kornia.augmentation")}
    placeholders["torchvision"].transforms = placeholders["torchvision.transforms"]
    placeholders["kornia"].augmentation = placeholders["kornia.augmentation"]
    placeholders.update({"imagen_pytorch": package, "imagen_pytorch.t5": t5})
    saved = {name: sys.modules.get(name) for name in placeholders}
    sys.modules.update(placeholders)
    try:
        return importlib.import_module("imagen_pytorch.imagen_pytorch").Unet
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        sys.modules.pop("imagen_pytorch.imagen_pytorch", None)
        sys.modules.pop("imagen_pytorch.imagen_video", None)


def text_inputs(batch_size: int):
    """(states, mask): random text states (B, TEXT_TOKENS, TEXT_DIM), every token visible."""
    return torch.randn(batch_size, TEXT_TOKENS, TEXT_DIM), torch.ones(batch_size, TEXT_TOKENS, dtype=torch.bool)


def peer_step(model, forward, x, precision: str):
    """One forward + backward + AdamW step of a peer on fixed inputs, under bf16 autocast if asked."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = (forward().float() - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def imagen_pytorch_step(size: dict, image_size: int, batch_size: int, precision: str):
    """(step, params) of imagen-pytorch's Unet at our levels: widths dim x (1, 2, 2), attention at the lower two."""
    Unet = import_imagen_pytorch_unet()
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints advice for widths under 128
        model = Unet(dim=size["dim"], dim_mults=(1, 2, 2), num_resnet_blocks=size["num_resnet_blocks"],
                     layer_attns=(False, True, True), layer_cross_attns=(False, True, True),
                     attn_heads=4, attn_dim_head=2 * size["dim"] // 4,
                     text_embed_dim=TEXT_DIM, max_text_len=TEXT_TOKENS)  # its default pads text to 256 tokens
    x = torch.randn(batch_size, 3, image_size, image_size)
    t = torch.rand(batch_size)  # continuous times (its noise schedules condition on them, not on integer steps)
    text, mask = text_inputs(batch_size)
    step = peer_step(model, lambda: model(x, t, text_embeds=text, text_mask=mask), x, precision)
    return step, sum(p.numel() for p in model.parameters())


def diffusers_step(size: dict, image_size: int, batch_size: int, precision: str):
    """(step, params) of diffusers' UNet2DConditionModel at our levels: widths dim x (1, 2, 2), cross-attention at the
    lower two."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    dim = size["dim"]
    model = UNet2DConditionModel(
        sample_size=image_size, in_channels=3, out_channels=3,
        block_out_channels=(dim, 2 * dim, 2 * dim), layers_per_block=size["layers_per_block"],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=4,  # this argument is the number of heads here
        norm_num_groups=8)
    x = torch.randn(batch_size, 3, image_size, image_size)
    t = torch.randint(0, 1000, (batch_size,))
    text, mask = text_inputs(batch_size)

    def forward():
        return model(x, t, encoder_hidden_states=text, encoder_attention_mask=mask, return_dict=False)[0]

    return peer_step(model, forward, x, precision), sum(p.numel() for p in model.parameters())


def ours_step(preset: str, batch_size: int, precision: str):
    """(step, params) of our Efficient U-Net preset (bench/unet_throughput.py's training step)."""
    step, model = training_step(preset, batch_size, precision)
    return step, model.num_parameters()


def time_round_robin(steps: dict, warmup: int, rounds: int) -> dict[str, float]:
    """Median seconds per step of each named step function, timed one step each per round, order rotating."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_set(preset: str, warmup: int, rounds: int, precisions: list[str]) -> None:
    """Build the row set's U-Nets, time them together, and print its table."""
    spec = ROW_SETS[preset]
    image_size, batch_size = unet_preset(preset).image_size, spec["batch_size"]
    builders = {
        f"ours ({preset})": lambda p: ours_step(preset, batch_size, p),
        "imagen-pytorch Unet": lambda p: imagen_pytorch_step(spec["imagen_pytorch"], image_size, batch_size, p),
        "diffusers UNet2DConditionModel": lambda p: diffusers_step(spec["diffusers"], image_size, batch_size, p),
    }
    print(f"\n### {preset}: {image_size}x{image_size}, batch {batch_size}, "
          f"{TEXT_TOKENS} text tokens of width {TEXT_DIM}\n", flush=True)
    ours = f"ours ({preset})"
    steps, params = {}, {}
    for name, build in builders.items():
        try:
            for p in precisions:
                steps[(name, p)], params[name] = build(p)
                steps[(name, p)]()  # a first, untimed step: a peer that builds but cannot train is skipped too
        except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported and skipped
            if name == ours:
                raise
            why = (str(e).splitlines() or [""])[0]
            print(f"{name}: skipped, it cannot be built or imported here ({type(e).__name__}: {why})")
            steps = {k: v for k, v in steps.items() if k[0] != name}
            params.pop(name, None)
    seconds = time_round_robin(steps, warmup, rounds)
    ips = {key: batch_size / s for key, s in seconds.items()}
    header = "| model | params (M) | params vs ours |"
    header += "".join(f" images/s {p} | ratio to ours {p} |" for p in precisions)
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for name in builders:
        if name not in params:
            continue
        row = f"| {name} | {params[name] / 1e6:.2f} | {params[name] / params[ours] - 1:+.0%} |"
        for p in precisions:
            row += f" {ips[(name, p)]:.1f} | {ips[(name, p)] / ips[(ours, p)]:.2f} |"
        print(row, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before timing (default: 2)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model, the median is reported (default: 10)")
    p.add_argument("--sets", default="base32,base16", help=f"row sets to run, of {', '.join(ROW_SETS)} (default: all)")
    args = p.parse_args()
    sets = [s for s in args.sets.split(",") if s]
    unknown = [s for s in sets if s not in ROW_SETS]
    if unknown or not sets:
        p.error(f"--sets {args.sets!r}: choose from {', '.join(ROW_SETS)}")
    if args.warmup < 0 or args.steps < 1:
        p.error(f"--warmup must be >= 0 and --steps >= 1, got {args.warmup} and {args.steps}")

    precisions = ["fp32"]
    if cpu_has_fast_bf16():
        precisions.append("bf16")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); median of {args.steps} round-robin steps "
          f"per model after {args.warmup} warm-up steps")
    if "bf16" not in precisions:
        print("bf16 autocast skipped: this CPU has no native bf16 (AMX or AVX512-BF16), so it would be emulated "
              "and far slower than fp32")
    for preset in sets:
        run_set(preset, args.warmup, args.steps, precisions)


if __name__ == "__main__":
    main()
