"""Fashion-MNIST test accuracy of the `small` preset trained from scratch (target >= 92 % in 20 min on 2 cores).

    python bench/fashion_mnist.py [--epochs 7] [--preset small] [--patch-size 4] [--out runs/bench-fmnist]

Published baselines for reference: SVC about 89.7 %, small CNNs 91-93 %.
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
    p.add_argument("--epochs", type=int, default=7)
    p.add_argument("--preset", default="small")
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--augment", default="shift-flip")
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", default="runs/bench-fmnist")
    args = p.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    start = time.time()
    result = imagen.finetune(
        "classify", "fashion-mnist", args.out, preset=args.preset, patch_size=args.patch_size, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=0.05, augment=args.augment, label_smoothing=0.1,
        precision=args.precision, dropout=0.0, eval_every=None, progress=False,
    )
    train_min = (time.time() - start) / 60
    report = imagen.evaluate(args.out, "fashion-mnist", split="test", echo=lambda *a, **k: None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"| fashion-mnist, {args.preset} (patch {args.patch_size}) from scratch, {args.epochs} epochs, {args.augment} "
          f"| test accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f} | train {train_min:.1f} min "
          f"(best val {result.best_metric:.4f} at step {result.best_step}) | {commit} |")


if __name__ == "__main__":
    main()
