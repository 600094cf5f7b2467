"""The classify recipe on a user's class folders: a few thousand images of another size than 32 px, no flags.

    python bench/class_folders.py [--size 28] [--train 5000] [--test 2000] [--out runs/bench-folders]

Writes a class-folder tree as a user would bring it (OUT/data/train/<class>/*.png, OUT/data/test/<class>/*.png)
from Fashion-MNIST: the first `--train` training images and the first `--test` test images, grey PNGs at 28 px or
upscaled bicubically to `--size` px. Then runs the bare command, `imagen finetune --task classify --data
OUT/data --out OUT/run` (the recipe fits itself to the data and says what it chose on lines `imagen: recipe: ...`),
and scores the test folder with `imagen evaluate`. Prints the recipe's choices, the test accuracy, the minutes and
the images/s of training.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from imagen.data import fashion_mnist as fm


def write_folder(root: Path, part: str, count: int, size: int) -> None:
    images, labels = fm.load_arrays(part)
    for i in range(count):
        folder = root / fm.CLASS_NAMES[labels[i]].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(np.ascontiguousarray(images[i]), mode="L")
        if size != picture.width:
            picture = picture.resize((size, size), Image.BICUBIC)
        picture.save(folder / f"{part}-{i:05d}.png")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=28, help="side of the written pictures in pixels")
    p.add_argument("--train", type=int, default=5000, help="training pictures (a tenth becomes the val split)")
    p.add_argument("--test", type=int, default=2000, help="test pictures")
    p.add_argument("--out", default="runs/bench-folders")
    args = p.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    write_folder(out / "data" / "train", "train", args.train, args.size)
    write_folder(out / "data" / "test", "t10k", args.test, args.size)
    start = time.time()
    train = subprocess.run([sys.executable, "-m", "imagen", "finetune", "--task", "classify", "--data", str(out / "data"),
                            "--out", str(out / "run"), "--no-progress"], capture_output=True, text=True)
    minutes = (time.time() - start) / 60
    if train.returncode:
        sys.exit(f"training failed:\n{train.stderr[-2000:]}")
    score = subprocess.run([sys.executable, "-m", "imagen", "evaluate", "--run", str(out / "run"), "--data",
                            str(out / "data"), "--split", "test", "--json"], capture_output=True, text=True, check=True)
    metrics = json.loads(score.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["samples_per_s"] for r in rows if r.get("split") == "train" and "samples_per_s" in r]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    for line in train.stderr.splitlines():
        if line.startswith("imagen: recipe"):
            print(line)
    print(f"| {args.train} training pictures at {args.size} px | test accuracy {metrics['accuracy']:.4f} "
          f"(macro-F1 {metrics['macro_f1']:.4f}, {args.test} pictures) | {minutes:.1f} min, "
          f"{np.median(speeds):.0f} images/s | {commit} |")


if __name__ == "__main__":
    main()
