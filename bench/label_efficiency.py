"""Label efficiency on Fashion-MNIST: pretrain on the unlabelled training images (masked image modelling),
fine-tune on 1 % of the labels, and compare with the same model trained from scratch on those labels.

    python bench/label_efficiency.py [--labels 550] [--pretrain-steps 3000] [--finetune-steps 400] [--preset small]

Target: pretrained + fine-tuned beats from-scratch by >= 5 accuracy points.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from pathlib import Path

import imagen


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", type=int, default=550, help="labelled training images (550 = 1 %% of 55,000)")
    p.add_argument("--preset", default="small")
    p.add_argument("--pretrain-steps", type=int, default=3000)
    p.add_argument("--pretrain-batch-size", type=int, default=256)
    p.add_argument("--finetune-steps", type=int, default=400)
    p.add_argument("--out", default="runs/bench-label-efficiency")
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    common = dict(progress=False, device=args.device)
    start = time.time()
    imagen.pretrain("fashion-mnist", out / "pretrain", preset=args.preset, image_only=True, max_steps=args.pretrain_steps,
                    batch_size=args.pretrain_batch_size, lr=5e-4, weight_decay=0.05, **common)
    pretrain_min = (time.time() - start) / 60
    rows = {}
    for name, init in (("pretrained", out / "pretrain"), ("scratch", None)):
        kw = dict(init_from=init) if init else dict(preset=args.preset)
        imagen.finetune("classify", "fashion-mnist", out / name, n=args.labels, max_steps=args.finetune_steps, batch_size=64,
                        lr=5e-4, augment="shift-flip", label_smoothing=0.1, eval_every=50, **kw, **common)
        rows[name] = imagen.evaluate(out / name, "fashion-mnist", split="test", compare_init=False, echo=lambda *a, **k: None)
    gain = 100 * (rows["pretrained"]["accuracy"] - rows["scratch"]["accuracy"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"| fashion-mnist, {args.labels} labels, {args.preset} | pretrained (MIM, {args.pretrain_steps} steps, {pretrain_min:.1f} min) "
          f"{rows['pretrained']['accuracy']:.4f} vs scratch {rows['scratch']['accuracy']:.4f}: {gain:+.1f} points | {commit} |")


if __name__ == "__main__":
    main()
