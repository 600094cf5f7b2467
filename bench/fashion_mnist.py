"""Fashion-MNIST test accuracy of `imagen finetune --task classify --data fashion-mnist` (target >= 0.92 within 20
minutes on 2 cores), with a small CNN trained for the same minutes beside it.

    python bench/fashion_mnist.py [--recipe default|best] [--cnn] [--out runs/bench-fmnist] [KEY=VALUE ...]

`default` is the bare command: the classify recipe fitted to the data, no options. `best` is the recipe the
README names for the best accuracy (more epochs, left-right flips). KEY=VALUE pairs are passed to
imagen.finetune as extra options (e.g. epochs=2 lr=5e-4), for ablations of the product path.
With --cnn, bench/encoder_ablation.py's SmallCNN trains on the same 55,000 images for as many minutes as the
encoder did and is scored on the same test set, so the encoder-vs-CNN ratio is known on one machine.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import torch

import imagen

BEST = {"epochs": 25, "augment": "shift-flip"}


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def cnn_for_minutes(minutes: float, batch_size: int = 128, lr: float = 2e-3, seed: int = 0) -> tuple[float, int]:
    """SmallCNN trained for `minutes` (whole epochs are not required): (test accuracy, optimiser steps)."""
    import encoder_ablation as ea  # bench/ sits on sys.path when this script runs
    from imagen.data import fashion_mnist as fm
    from imagen.data.augment import augment
    from imagen.data.images import normalize_images
    from imagen.train.optim import lr_lambda, param_groups

    (xt, yt), _ = ea.data(28)
    images, labels = fm.load_arrays("t10k")
    xs = torch.from_numpy(images.copy())[:, None].expand(-1, 3, -1, -1).contiguous()
    ys = torch.from_numpy(labels.copy())
    # Steps that fit the minutes, from the speed of 20 timed steps, so the schedule can end where the time does.
    torch.manual_seed(seed)
    probe = ea.SmallCNN(10, label_smoothing=0.1)
    opt = torch.optim.AdamW(param_groups(probe, 0.05), lr=lr)
    start = time.time()
    for _ in range(20):
        idx = torch.randint(0, len(xt), (batch_size,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = probe(normalize_images(xt[idx]), yt[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
    steps = max(20, int(minutes * 60 / ((time.time() - start) / 20)))
    torch.manual_seed(seed)
    model = ea.SmallCNN(10, label_smoothing=0.1)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, round(0.05 * steps), steps, 0.0))
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(xt), generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(xt), generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(normalize_images(augment(xt[idx], "shift-flip")), yt[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return ea.accuracy(model, xs, ys, "bf16"), steps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", choices=("default", "best"), default="default")
    p.add_argument("--cnn", action="store_true", help="also train the small CNN for the same minutes")
    p.add_argument("--cnn-only", type=float, default=None, metavar="MINUTES",
                   help="train only the small CNN, for MINUTES (e.g. the encoder's minutes of an earlier run)")
    p.add_argument("--out", default="runs/bench-fmnist")
    p.add_argument("options", nargs="*", metavar="KEY=VALUE", help="extra imagen.finetune options")
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if args.cnn_only is not None:
        acc, steps = cnn_for_minutes(args.cnn_only)
        print(f"| small CNN, {args.cnn_only:g} min | {steps} steps of 128, shift-flip | test accuracy {acc:.4f} | {commit} |")
        return
    options = dict(BEST) if args.recipe == "best" else {}
    for pair in args.options:
        key, _, value = pair.partition("=")
        options[key] = _value(value)

    shutil.rmtree(args.out, ignore_errors=True)
    start = time.time()
    result = imagen.finetune("classify", "fashion-mnist", args.out, progress=False, **options)
    train_min = (time.time() - start) / 60
    report = imagen.evaluate(args.out, "fashion-mnist", split="test", echo=lambda *a, **k: None)
    cfg = json.loads((Path(args.out) / "config.json").read_text())
    m, t, c = cfg["model"], cfg["train"], cfg["task_config"]
    images_seen = result.step * t["batch_size"]
    recipe = (f"{m['dim']}-d x {m['num_layers']} layers, {m['image_size']} px / patch {m['patch_size']}, stem "
              f"{m['stem_layers']}, {t['epochs']} epochs, batch {t['batch_size']}, lr {t['lr']:g}, {c['augment']}, "
              f"smoothing {c['label_smoothing']:g}")
    extra = " ".join(args.options)
    print(f"| {args.recipe}{' ' + extra if extra else ''} | {recipe} | test accuracy {report['accuracy']:.4f}, macro-F1 "
          f"{report['macro_f1']:.4f} | {train_min:.1f} min, {images_seen / (train_min * 60):.0f} images/s, peak "
          f"{result.peak_mem_mb:.0f} MB (best val {result.best_metric:.4f} at step {result.best_step}) | {commit} |",
          flush=True)
    if args.cnn:
        acc, steps = cnn_for_minutes(train_min)
        ratio = report["accuracy"] / acc
        print(f"| small CNN, same {train_min:.1f} min | {steps} steps of 128, shift-flip | test accuracy {acc:.4f} | "
              f"encoder / CNN = {ratio:.3f} ({100 * (report['accuracy'] - acc):+.1f} points) | {commit} |")
    if not math.isfinite(report["accuracy"]):
        raise SystemExit("non-finite accuracy")


if __name__ == "__main__":
    main()
