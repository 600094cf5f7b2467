"""Encoder ablations on Fashion-MNIST: one change at a time against a small CNN, on the same data and budget.

    python bench/encoder_ablation.py [--steps 430] [--batch-size 128] [--variants cnn,base,...] [--threads 2]

Each variant trains from the same seed for the same number of optimiser steps (AdamW, linear warmup + cosine,
bf16 autocast unless the variant says fp32) on the 55,000 training images and prints its validation accuracy
on the 5,000 held-out ones, its train accuracy over the last 50 steps and its images/s. The loop is the
toolkit's (its model classes, augmentation, optimiser groups and schedule) reduced to what is being measured,
so a variant differs from `base` only by the change named.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import time

import torch
import torch.nn.functional as F
from torch import nn

from imagen.config import encoder_config
from imagen.data import fashion_mnist as fm
from imagen.data.augment import augment
from imagen.data.images import normalize_images
from imagen.models.heads import EncoderForClassification
from imagen.train.optim import lr_lambda, param_groups


class SmallCNN(nn.Module):
    """Three conv blocks (conv-BN-ReLU x2, max-pool) and global average pooling: the usual small-CNN baseline."""

    def __init__(self, num_classes: int = 10, width: int = 32, label_smoothing: float = 0.0):
        super().__init__()
        layers, c_in = [], 3
        for c in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)
        self.label_smoothing = label_smoothing

    def forward(self, images, labels=None):
        logits = self.fc(self.features(images).mean((2, 3))).float()
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing) if labels is not None else None
        return logits, loss


# Each variant: overrides of the base recipe. Model keys go to encoder_config, the rest steer the loop.
BASE = dict(model="vit", preset="small", patch_size=4, stem_channels=32, lr=2e-3, weight_decay=0.05, warmup=0.05,
            augment="shift-flip", label_smoothing=0.1, precision="bf16", pooling="mean", grad_clip=1.0, size=28)
VARIANTS: dict[str, dict] = {
    "cnn": dict(model="cnn", lr=2e-3),
    "base": {},
    "fp32": dict(precision="fp32"),
    "lr1e-3": dict(lr=1e-3),
    "lr5e-4": dict(lr=5e-4),
    "no-aug": dict(augment="none"),
    "no-stem": dict(stem_channels=0),
    "cls": dict(pooling="cls"),
    "tiny": dict(preset="tiny"),
    "depth3": dict(num_layers=3),
    "no-clip": dict(grad_clip=0.0),
    "warmup0.2": dict(warmup=0.2),
    "stem3": dict(stem_layers=3),
    "stem3-lr5e-4": dict(stem_layers=3, lr=5e-4),
    "stem3-lr1e-3": dict(stem_layers=3, lr=1e-3),
    "beta2-0.95": dict(betas=(0.9, 0.95)),
    "mid": dict(stem_layers=3, dim=128, num_heads=4, mlp_ratio=2.0),
    "mid-stem64": dict(stem_layers=3, stem_channels=64, dim=128, num_heads=4, mlp_ratio=2.0),
    "mid4": dict(stem_layers=3, dim=128, num_layers=4, num_heads=4, mlp_ratio=2.0),
    "qknorm": dict(qk_norm=True),
    "qknorm-lr1e-3": dict(qk_norm=True, lr=1e-3),
    "stem3-qknorm": dict(stem_layers=3, qk_norm=True),
}
# The classify recipe for real images as it stood before the second round of ablations (three-layer 32-channel stem;
# tasks/classify.py RECIPE_MODEL holds the current one: `recipe-stem64-4layers` below) and changes to it.
RECIPE = dict(preset="mini", stem_layers=3, stem_channels=32, qk_norm=True, augment="shift")
VARIANTS.update({
    "recipe": RECIPE,
    "recipe-fp32": {**RECIPE, "precision": "fp32"},
    "recipe-stem64": {**RECIPE, "stem_channels": 64},
    "recipe-bn": {**RECIPE, "stem_norm": "batch"},
    "recipe-bn-stem64": {**RECIPE, "stem_norm": "batch", "stem_channels": 64},
    "recipe-stem4": {**RECIPE, "stem_layers": 4},
    "recipe-bn-stem4": {**RECIPE, "stem_norm": "batch", "stem_layers": 4},
    "recipe-lr3e-3": {**RECIPE, "lr": 3e-3},
    "recipe-6layers": {**RECIPE, "num_layers": 6},
    "recipe-stem64-lr3e-3": {**RECIPE, "stem_channels": 64, "lr": 3e-3},
    "recipe-stem64-4layers": {**RECIPE, "stem_channels": 64, "stem_layers": 4},
    "recipe-stem64-192d": {**RECIPE, "stem_channels": 64, "dim": 192, "num_heads": 6},
    "recipe-stem96": {**RECIPE, "stem_channels": 96},
    "recipe-bn-stem64-4layers": {**RECIPE, "stem_norm": "batch", "stem_channels": 64, "stem_layers": 4},
    "recipe-bn-stem5": {**RECIPE, "stem_norm": "batch", "stem_layers": 5},
})
MODEL_KEYS = ("patch_size", "stem_channels", "stem_layers", "stem_norm", "qk_norm", "num_layers", "dim", "num_heads", "mlp_ratio", "dropout")


def build(v: dict, num_classes: int) -> nn.Module:
    if v["model"] == "cnn":
        return SmallCNN(num_classes, label_smoothing=v["label_smoothing"])
    cfg = encoder_config(v["preset"], image_size=v["size"], **{k: v[k] for k in MODEL_KEYS if k in v})
    return EncoderForClassification(cfg, num_classes, v["label_smoothing"], pooling=v["pooling"])


def forward(model, images, labels=None):
    if isinstance(model, SmallCNN):
        return model(images, labels)
    out = model(images=images, labels=labels)
    return out.logits, out.loss


def data(size: int):
    images, labels = fm.load_arrays("train")
    x = torch.from_numpy(images.copy())[:, None].expand(-1, 3, -1, -1)
    if size != x.shape[-1]:
        x = F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True).round().clamp(0, 255).to(torch.uint8)
    y = torch.from_numpy(labels.copy())
    return (x[:55000].contiguous(), y[:55000]), (x[55000:].contiguous(), y[55000:])


@torch.no_grad()
def accuracy(model, x, y, precision) -> float:
    model.eval()
    correct = 0
    for k in range(0, len(x), 500):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits, _ = forward(model, normalize_images(x[k:k + 500]))
        correct += int((logits.argmax(-1) == y[k:k + 500]).sum())
    model.train()
    return correct / len(x)


def run(name: str, steps: int, batch_size: int, seed: int) -> dict:
    v = {**BASE, **VARIANTS[name]}
    (xt, yt), (xv, yv) = data(v["size"])
    torch.manual_seed(seed)
    model = build(v, 10)
    opt = torch.optim.AdamW(param_groups(model, v["weight_decay"]), lr=v["lr"], betas=v.get("betas", (0.9, 0.999)))
    warmup = round(v["warmup"] * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, warmup, steps, 0.0))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(xt), generator=gen)
    pos, accs = 0, []
    start = time.time()
    for step in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(xt), generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        images = normalize_images(augment(xt[idx], v["augment"]))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=v["precision"] == "bf16"):
            logits, loss = forward(model, images, yt[idx])
        loss.backward()
        if v["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), v["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if not math.isfinite(float(loss.detach())):
            raise SystemExit(f"{name}: non-finite loss at step {step}")
        accs.append(float((logits.argmax(-1) == yt[idx]).float().mean()))
    seconds = time.time() - start
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return dict(name=name, val=accuracy(model, xv, yv, v["precision"]), train=sum(accs[-50:]) / len(accs[-50:]),
                ips=steps * batch_size / seconds, minutes=seconds / 60, params=params)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=430)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--variants", default="cnn,base")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print("| variant | change | params (M) | val acc | train acc (last 50 steps) | images/s | minutes | commit |", flush=True)
    for name in args.variants.split(","):
        r = run(name, args.steps, args.batch_size, args.seed)
        change = ", ".join(f"{k}={v}" for k, v in VARIANTS[name].items()) or "-"
        print(f"| {name} | {change} | {r['params']:.2f} | {r['val']:.4f} | {r['train']:.4f} | {r['ips']:.0f} | "
              f"{r['minutes']:.1f} | {commit} |", flush=True)


if __name__ == "__main__":
    main()
