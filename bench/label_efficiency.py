"""Label efficiency on Fashion-MNIST: pretrain on the unlabelled training images (masked image modelling),
fine-tune on 1 % of the labels, and compare with the same model trained from scratch on those labels.

    python bench/label_efficiency.py [--labels 550] [--pretrain-steps 2000] [--finetune-steps 400] [--mask-ratio 0.75]

The model is the classify recipe's for real images (tasks/classify.py RECIPE_MODEL: `mini` behind a four-layer 64-channel stem,
QK-norm). Rows: the pretraining run's linear probe (scikit-learn logistic regression on the frozen pooled encoder,
fit on the first 5,000 labelled training images, the pretrain task's own evaluation); pretrained + fine-tuned on the
labelled images; from scratch with the same fine-tuning schedule; and from scratch with the bare command's recipe for
that many images (`imagen finetune --task classify --data fashion-mnist --n 550`). The gain is taken against the
better of the two scratch rows. Target: pretrained + fine-tuned beats from-scratch by >= 5 accuracy points, with at
most 20 minutes of pretraining.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from pathlib import Path

import imagen
from imagen.tasks.classify import RECIPE_MODEL


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", type=int, default=550, help="labelled training images (550 = 1 %% of 55,000)")
    p.add_argument("--pretrain-steps", type=int, default=2000)
    p.add_argument("--pretrain-batch-size", type=int, default=256)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--mask-ratio", type=float, default=0.75, help="share of patches masked in pretraining")
    p.add_argument("--blank-pixels", action=argparse.BooleanOptionalAction, default=True,
                   help="hide the masked patches' pixels from the stem too (pretrain.mim_blank_pixels)")
    p.add_argument("--finetune-steps", type=int, default=400)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--out", default="runs/bench-label-efficiency")
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    common = dict(progress=False, device=args.device, report_to=("jsonl",))
    model = {k: v for k, v in RECIPE_MODEL.items() if k != "preset"}
    quiet = dict(compare_init=False, echo=lambda *a, **k: None)
    start = time.time()
    imagen.pretrain("fashion-mnist", out / "pretrain", preset=RECIPE_MODEL["preset"], image_only=True,
                    max_steps=args.pretrain_steps, batch_size=args.pretrain_batch_size, lr=args.pretrain_lr,
                    weight_decay=0.05, mim_mask_ratio=args.mask_ratio, mim_blank_pixels=args.blank_pixels,
                    **model, **common)
    pretrain_min = (time.time() - start) / 60
    rows = {"linear probe (5,000 labels)": imagen.evaluate(out / "pretrain", "fashion-mnist", split="test", **quiet)}
    schedule = dict(n=args.labels, max_steps=args.finetune_steps, batch_size=64, augment="shift", label_smoothing=0.1,
                    eval_every=50)
    imagen.finetune("classify", "fashion-mnist", out / "pretrained", init_from=out / "pretrain", lr=args.finetune_lr,
                    **schedule, **common)
    rows["pretrained + fine-tuned"] = imagen.evaluate(out / "pretrained", "fashion-mnist", split="test", **quiet)
    imagen.finetune("classify", "fashion-mnist", out / "scratch", preset=RECIPE_MODEL["preset"], lr=args.finetune_lr,
                    **model, **schedule, **common)
    rows["scratch, same schedule"] = imagen.evaluate(out / "scratch", "fashion-mnist", split="test", **quiet)
    imagen.finetune("classify", "fashion-mnist", out / "scratch-recipe", n=args.labels, **common)
    rows["scratch, the bare command's recipe"] = imagen.evaluate(out / "scratch-recipe", "fashion-mnist", split="test", **quiet)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"fashion-mnist, {args.labels} labels; MIM pretraining {args.pretrain_steps} steps of {args.pretrain_batch_size}, "
          f"mask ratio {args.mask_ratio}, {pretrain_min:.1f} min; commit {commit}")
    print("| run | test accuracy |\n| --- | --- |")
    for name, score in rows.items():
        print(f"| {name} | {score['accuracy']:.4f} |")
    scratch = max(rows["scratch, same schedule"]["accuracy"], rows["scratch, the bare command's recipe"]["accuracy"])
    print(f"gain of pretraining over the better scratch row: {100 * (rows['pretrained + fine-tuned']['accuracy'] - scratch):+.1f} points")


if __name__ == "__main__":
    main()
