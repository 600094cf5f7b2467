"""Label efficiency on Fashion-MNIST: pretrain on the unlabelled training images (masked image modelling),
fine-tune on 1 % of the labels, and compare with the same model trained from scratch on those labels.

    python bench/label_efficiency.py [--labels 550] [--pretrain-steps 2000] [--finetune-steps 400] [--mask-ratio 0.75]
        [--decoder-layers 0] [--layer-decay 1.0] [--pretrained RUN]

The model is the classify recipe's for real images (tasks/classify.py RECIPE_MODEL: `mini` behind a four-layer 64-channel stem,
QK-norm). Rows: the pretraining run's linear probe (scikit-learn logistic regression on the frozen pooled encoder,
fit on the first 5,000 labelled training images, the pretrain task's own evaluation); pretrained + fine-tuned on the
labelled images, with a short fixed schedule and with the bare command's schedule for that many images (each also
with layer-wise lr decay when --layer-decay < 1); from scratch with the same short schedule; and from scratch with the
bare command's recipe (`imagen finetune --task classify --data fashion-mnist --n 550`). The gain is taken as the
best pretrained row against the better of the two scratch rows. `--decoder-layers N` pretrains MAE-style (the encoder
sees only the visible patches, an N-block decoder predicts the pixels); `--pretrained RUN` reuses a pretraining run. Target: pretrained + fine-tuned beats from-scratch by >= 5 accuracy points, with at
most 20 minutes of pretraining.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from pathlib import Path

import imagen
from imagen.tasks.classify import RECIPE_MODEL, RECIPE_OPTIONS, recipe_epochs


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", type=int, default=550, help="labelled training images (550 = 1 %% of 55,000)")
    p.add_argument("--pretrain-steps", type=int, default=2000)
    p.add_argument("--pretrain-batch-size", type=int, default=256)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--mask-ratio", type=float, default=0.75, help="share of patches masked in pretraining")
    p.add_argument("--blank-pixels", action=argparse.BooleanOptionalAction, default=True,
                   help="hide the masked patches' pixels from the stem too (pretrain.mim_blank_pixels)")
    p.add_argument("--decoder-layers", type=int, default=0, help="MAE decoder blocks (0: SimMIM's linear head)")
    p.add_argument("--decoder-dim", type=int, default=0, help="MAE decoder width (0: the encoder's)")
    p.add_argument("--pretrained", default=None, help="reuse this finished pretraining run instead of pretraining")
    p.add_argument("--layer-decay", type=float, default=1.0, help="also fine-tune with this layer-wise lr decay")
    p.add_argument("--finetune-steps", type=int, default=400)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--out", default="runs/bench-label-efficiency")
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    out = Path(args.out)
    pretrained = Path(args.pretrained) if args.pretrained else out / "pretrain"
    # Clear what an earlier bench run wrote, never the pretraining run being reused (it may sit inside --out).
    for old in out.iterdir() if out.is_dir() else ():
        if args.pretrained is None or old.resolve() != pretrained.resolve():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    common = dict(progress=False, device=args.device, report_to=("jsonl",))
    model = {k: v for k, v in RECIPE_MODEL.items() if k != "preset"}
    quiet = dict(compare_init=False, echo=lambda *a, **k: None)
    start = time.time()
    if args.pretrained is None:
        imagen.pretrain("fashion-mnist", pretrained, preset=RECIPE_MODEL["preset"], image_only=True,
                        max_steps=args.pretrain_steps, batch_size=args.pretrain_batch_size, lr=args.pretrain_lr,
                        weight_decay=0.05, mim_mask_ratio=args.mask_ratio, mim_blank_pixels=args.blank_pixels,
                        mim_decoder_layers=args.decoder_layers, mim_decoder_dim=args.decoder_dim, **model, **common)
    pretrain_min = (time.time() - start) / 60
    rows = {"linear probe (5,000 labels)": imagen.evaluate(pretrained, "fashion-mnist", split="test", **quiet)}
    schedule = dict(n=args.labels, max_steps=args.finetune_steps, batch_size=64, augment="shift", label_smoothing=0.1,
                    eval_every=50)
    # The schedule the bare command fits to this many images (tasks/classify.py), which a run started from another
    # does not get by itself.
    epochs, patience = recipe_epochs(args.labels)
    fitted = dict(n=args.labels, epochs=epochs, early_stopping_patience=patience, **RECIPE_OPTIONS)
    schedules = {"short": ("short schedule", dict(schedule, lr=args.finetune_lr)), "recipe": ("the recipe's schedule", fitted)}
    for decay in [1.0] + ([args.layer_decay] if args.layer_decay < 1.0 else []):
        tag = f", layer decay {decay:g}" if decay < 1.0 else ""
        for key, (name, sched) in schedules.items():
            run = out / f"pretrained-{key}-{decay:g}"
            imagen.finetune("classify", "fashion-mnist", run, init_from=pretrained, layer_decay=decay, **sched, **common)
            rows[f"pretrained + fine-tuned, {name}{tag}"] = imagen.evaluate(run, "fashion-mnist", split="test", **quiet)
    imagen.finetune("classify", "fashion-mnist", out / "scratch", preset=RECIPE_MODEL["preset"], lr=args.finetune_lr,
                    **model, **schedule, **common)
    rows["scratch, same schedule"] = imagen.evaluate(out / "scratch", "fashion-mnist", split="test", **quiet)
    imagen.finetune("classify", "fashion-mnist", out / "scratch-recipe", n=args.labels, **common)
    rows["scratch, the bare command's recipe"] = imagen.evaluate(out / "scratch-recipe", "fashion-mnist", split="test", **quiet)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    how = (f"reused {pretrained}" if args.pretrained else
           f"MIM pretraining {args.pretrain_steps} steps of {args.pretrain_batch_size}, mask ratio {args.mask_ratio}, "
           f"decoder {args.decoder_layers} layers, {pretrain_min:.1f} min")
    print(f"fashion-mnist, {args.labels} labels; {how}; commit {commit}")
    print("| run | test accuracy |\n| --- | --- |")
    for name, score in rows.items():
        print(f"| {name} | {score['accuracy']:.4f} |")
    scratch = max(rows["scratch, same schedule"]["accuracy"], rows["scratch, the bare command's recipe"]["accuracy"])
    best = max((name for name in rows if name.startswith("pretrained")), key=lambda name: rows[name]["accuracy"])
    print(f"gain of pretraining ({best}) over the better scratch row: {100 * (rows[best]['accuracy'] - scratch):+.1f} points")


if __name__ == "__main__":
    main()
