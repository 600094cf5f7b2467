"""Label efficiency on Fashion-MNIST: pretrain on the unlabelled training images (masked image modelling),
fine-tune on 1 % of the labels, and compare with the same model trained from scratch on those labels.

    python bench/label_efficiency.py [--labels 550] [--pretrain-steps N] [--decoder-layers N] [--mask-ratio R]
        [--layer-decay D] [--finetune-steps 400] [--pretrained RUN]

By default every run is a bare command with the recipes for real images: `imagen pretrain --data fashion-mnist
--image-only` (tasks/pretrain.py: the classify recipe's model, `mini` behind a four-layer 64-channel stem with
QK-norm; MAE-style masked image modelling, 75 % masked, a one-block decoder; 12 epochs of 256) and `imagen finetune
--task classify --data fashion-mnist --n 550 [--init-from PRETRAIN]` (tasks/classify.py: 100 epochs for 550 images,
the best validated weights; from a pretrained run with layer-wise lr decay 0.65). Rows: the pretraining run's linear
probe (scikit-learn logistic regression on the frozen pooled encoder, fit on the first 5,000 labelled training
images, the pretrain task's own evaluation); pretrained + fine-tuned by the bare command; pretrained + fine-tuned
with a short fixed schedule (400 steps of 64, no layer decay); from scratch with that short schedule; and from
scratch by the bare command. The gain is the best pretrained row against the better of the two scratch rows.
Options given here replace the recipes' values (`--decoder-layers 0`: SimMIM's linear head); `--pretrained RUN`
reuses a pretraining run. Target: pretrained + fine-tuned beats from-scratch by >= 5 accuracy points, with at most
20 minutes of pretraining.
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
    p.add_argument("--pretrain-steps", type=int, default=None, help="pretraining steps (default: the recipe's epochs)")
    p.add_argument("--pretrain-batch-size", type=int, default=None)
    p.add_argument("--pretrain-lr", type=float, default=None)
    p.add_argument("--mask-ratio", type=float, default=None, help="share of patches masked in pretraining")
    p.add_argument("--blank-pixels", action=argparse.BooleanOptionalAction, default=None,
                   help="hide the masked patches' pixels from the stem too (pretrain.mim_blank_pixels)")
    p.add_argument("--decoder-layers", type=int, default=None, help="MAE decoder blocks (0: SimMIM's linear head)")
    p.add_argument("--decoder-dim", type=int, default=None, help="MAE decoder width (0: the encoder's)")
    p.add_argument("--pretrained", default=None, help="reuse this finished pretraining run instead of pretraining")
    p.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay of the bare fine-tuning command")
    p.add_argument("--finetune-steps", type=int, default=400, help="steps of the short schedule")
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="lr of the short schedule")
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
    quiet = dict(compare_init=False, echo=lambda *a, **k: None)
    given = {"max_steps": args.pretrain_steps, "batch_size": args.pretrain_batch_size, "lr": args.pretrain_lr,
             "mim_mask_ratio": args.mask_ratio, "mim_blank_pixels": args.blank_pixels,
             "mim_decoder_layers": args.decoder_layers, "mim_decoder_dim": args.decoder_dim}
    start = time.time()
    if args.pretrained is None:
        imagen.pretrain("fashion-mnist", pretrained, image_only=True, **{k: v for k, v in given.items() if v is not None},
                        **common)
    pretrain_min = (time.time() - start) / 60
    rows = {"linear probe (5,000 labels)": imagen.evaluate(pretrained, "fashion-mnist", split="test", **quiet)}
    decay = {"layer_decay": args.layer_decay} if args.layer_decay is not None else {}
    imagen.finetune("classify", "fashion-mnist", out / "pretrained", init_from=pretrained, n=args.labels, **decay, **common)
    rows["pretrained + fine-tuned, bare command"] = imagen.evaluate(out / "pretrained", "fashion-mnist", split="test", **quiet)
    short = dict(n=args.labels, max_steps=args.finetune_steps, batch_size=64, lr=args.finetune_lr, augment="shift",
                 label_smoothing=0.1, eval_every=50, **common)
    imagen.finetune("classify", "fashion-mnist", out / "pretrained-short", init_from=pretrained, layer_decay=1.0, **short)
    rows["pretrained + fine-tuned, short schedule"] = imagen.evaluate(out / "pretrained-short", "fashion-mnist",
                                                                      split="test", **quiet)
    pre = imagen.load(pretrained).config
    model = pre.model  # the same architecture from scratch
    shape = {"preset": "mini", **{k: getattr(model, k) for k in ("image_size", "patch_size", "stem_layers",
                                                                    "stem_channels", "qk_norm")}}
    imagen.finetune("classify", "fashion-mnist", out / "scratch", **shape, **short)
    rows["scratch, short schedule"] = imagen.evaluate(out / "scratch", "fashion-mnist", split="test", **quiet)
    imagen.finetune("classify", "fashion-mnist", out / "scratch-recipe", n=args.labels, **common)
    rows["scratch, bare command"] = imagen.evaluate(out / "scratch-recipe", "fashion-mnist", split="test", **quiet)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    how = (f"{'reused ' + str(pretrained) if args.pretrained else f'pretraining {pretrain_min:.1f} min'}: "
           f"{pre.train.max_steps or pre.train.epochs} {'steps' if pre.train.max_steps else 'epochs'} of "
           f"{pre.train.batch_size}, mask ratio {pre.task_config['mim_mask_ratio']}, decoder "
           f"{pre.task_config['mim_decoder_layers']} layers")
    print(f"fashion-mnist, {args.labels} labels; {how}; commit {commit}")
    print("| run | test accuracy |\n| --- | --- |")
    for name, score in rows.items():
        print(f"| {name} | {score['accuracy']:.4f} |")
    scratch = max(rows["scratch, short schedule"]["accuracy"], rows["scratch, bare command"]["accuracy"])
    best = max((name for name in rows if name.startswith("pretrained")), key=lambda name: rows[name]["accuracy"])
    print(f"gain of pretraining ({best}) over the better scratch row: {100 * (rows[best]['accuracy'] - scratch):+.1f} points")


if __name__ == "__main__":
    main()
