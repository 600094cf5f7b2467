"""The `imagen` command line: parse arguments, call the library, turn known errors into one clear line."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path

# torch-free imports only, so `imagen --help` stays fast
from imagen.config import (
    CAPTION_MODES,
    COMPILE_MODES,
    DEFAULT_AUG_LEVEL,
    DEFAULT_DISTILL_GUIDANCE_RANGE,
    DEFAULT_DISTILL_LR,
    DEFAULT_DISTILL_STAGES,
    DEFAULT_DISTILL_STEPS,
    DEFAULT_PROGRESSIVE_PHASE_STEPS,
    DEFAULT_PROGRESSIVE_START_STEPS,
    DEFAULT_GUIDANCE,
    DEFAULT_PERCENTILE,
    DEFAULT_REFRESH_REPLAY,
    DEFAULT_REFRESH_TOLERANCE,
    DEFAULT_SAMPLER,
    DEFAULT_SAMPLING_BATCH_SIZE,
    DEFAULT_SAMPLING_STEPS,
    DEFAULT_SERVE_MAX_BATCH,
    DEFAULT_SERVE_MAX_WAIT_MS,
    DEFAULT_SERVE_QUEUE,
    DEFAULT_SERVE_TIMEOUT_S,
    DEFAULT_STRENGTH,
    DEFAULT_T2I_CAPTIONS,
    DEFAULT_T2I_STEPS,
    DEFAULT_THRESHOLD,
    ENCODER_PRESETS,
    SAMPLER_NAMES,
    THRESHOLD_NAMES,
    TrainConfig,
    default_of,
)
from imagen.errors import USER_ERRORS, ConfigError
from imagen.tasks.registry import FINETUNE_TASKS

# Nothing here may reach a model hub; fail fast instead of waiting on network retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem and where to look."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _sampling_steps(text):
    """--steps: N for every stage, or steps per stage: base=8,sr1=25, or 25,base=8 (a stage not named takes the bare
    count, else the default). Returns (count or None, {stage: count})."""
    steps, stages = None, {}
    for item in text.split(","):
        name, named, count = (part.strip() for part in item.strip().rpartition("="))
        if named and not name:
            raise argparse.ArgumentTypeError(f"{item.strip()!r}: name the stage before '=', e.g. base=8")
        value = _positive_int(count)
        if not named:
            if steps is not None:
                raise argparse.ArgumentTypeError(f"{text!r}: one bare step count (for every stage); name the others, e.g. 25,base=8")
            steps = value
        elif name in stages:
            raise argparse.ArgumentTypeError(f"{text!r}: stage {name!r} is named twice")
        else:
            stages[name] = value
    return steps, stages


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _add_data_args(p):
    p.add_argument("--data", default="shapes", help="built-in name (shapes, fashion-mnist, emoji; shapes:compositional draws more two-object and counted scenes) or a path (default: shapes)")
    # --num-samples: torchrun's own parser takes "--n" after the program for an abbreviation of its --nnodes.
    p.add_argument("--n", "--num-samples", dest="n", type=_positive_int, default=None, help="number of training samples to use (default: all / built-in size)")
    p.add_argument("--on-bad-sample", choices=("skip", "error"), default="skip", help="skip unreadable samples (named in a warning) or stop (default: skip)")


def _add_train_args(p, lr=None, batch_size=None, epochs=None, recipe_note=None, steps_note=None, image_size=True,
                    search=False, model_options=True):
    """Training options; a default left None is TrainConfig's (shown in the help) or, with `recipe_note`, the
    task's recipe. Nothing is filled in here, so the library sees only what the user gave. With `search` (imagen
    tune) they are the options every trial shares, and --out / --resume name the search's directory."""
    d = lambda name: default_of(TrainConfig, name)  # noqa: E731
    g = p.add_argument_group("training (every trial's, unless searched)" if search else "training")
    g.add_argument("--out", required=True, help="search directory to create, join or continue with --resume" if search
                   else "run directory to create (or continue with --resume)")
    if model_options:  # distill keeps its teacher's model
        g.add_argument("--preset", default=None, choices=tuple(ENCODER_PRESETS),
                       help="model size (default: the task's recipe for the data; tiny where it names none)")
    g.add_argument("--optimizer", choices=("adamw", "sgd"), default=None, help=f"optimiser (default: {d('optimizer')})")
    g.add_argument("--lr", type=_positive_float, default=None, help=f"peak learning rate (default: {recipe_note or lr or d('lr')})")
    g.add_argument("--batch-size", type=_positive_int, default=None, help=f"batch size (default: {batch_size or d('batch_size')})")
    g.add_argument("--epochs", type=_positive_int, default=None,
                   help="epochs over the training split (default: " + (recipe_note or steps_note or str(epochs or d("epochs"))) + ")")
    g.add_argument("--max-steps", type=_positive_int, default=None, help="optimiser steps; overrides --epochs" + (f" (default: {steps_note})" if steps_note else ""))
    g.add_argument("--warmup-steps", type=int, default=None, help=f"linear warmup steps (default: {d('warmup_ratio') * 100:g}%% of the run)")
    g.add_argument("--weight-decay", type=float, default=None, help=f"AdamW/SGD weight decay, never on norms, biases or embeddings (default: {d('weight_decay')})")
    if model_options:
        g.add_argument("--dropout", type=float, default=None, help="dropout in the encoder and head (default: 0)")
    if image_size:  # train-t2i sets its stages' sizes with --sizes
        g.add_argument("--image-size", type=_positive_int, default=None,
                       help="side in pixels the images are resized to (default: chosen from the data, or the --init-from "
                            "run's; a pretrained run's position embeddings are resampled to it)")
    g.add_argument("--grad-clip", type=float, default=None, help=f"clip the gradient norm to this value, 0 = off (default: {d('grad_clip')})")
    g.add_argument("--grad-accum", type=_positive_int, default=None, help=f"micro-batches per optimiser step (default: {d('grad_accum')})")
    g.add_argument("--eval-every", type=_positive_int, default=None, help="validate every N steps (default: each epoch)")
    g.add_argument("--early-stopping-patience", type=_positive_int, default=None, help="stop after N validations without improvement")
    g.add_argument("--checkpoint-every", type=_positive_int, default=None, help="save a resumable checkpoint every N steps")
    g.add_argument("--seed", type=int, default=None, help=f"random seed (default: {d('seed')})")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None, help="auto = bf16 on CUDA and on CPUs with AMX (default: auto)")
    g.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    g.add_argument("--compile", choices=COMPILE_MODES, default=None,
                   help="torch.compile the networks that train: default, reduce-overhead (CUDA graphs too, for small "
                        "models on a GPU) or max-autotune; the first steps wait for the compiler (default: off)")
    g.add_argument("--report-to", default=None, help="comma list of loggers: jsonl, tensorboard, wandb (offline) (default: jsonl,tensorboard)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--resume", action="store_true", help="continue the search in --out: finished trials are kept, an interrupted one runs again" if search
                   else "continue the run in --out from its latest checkpoint")
    if search:
        g.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any config value, e.g. --set model.dim=96")
        return
    g.add_argument("--nproc", type=_positive_int, default=None, help="train with N processes on this machine (what `torchrun --standalone --nproc-per-node N` launches); --batch-size is then the global batch (default: 1)")
    if model_options:
        g.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any config value, e.g. --set model.dim=96")


def _train_kwargs(args) -> dict:
    kw = dict(
        optimizer=args.optimizer, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, dropout=getattr(args, "dropout", None),
        image_size=getattr(args, "image_size", None), grad_clip=args.grad_clip,
        grad_accum=args.grad_accum, eval_every=args.eval_every, early_stopping_patience=args.early_stopping_patience,
        checkpoint_every=args.checkpoint_every, seed=args.seed, precision=args.precision, device=args.device,
        compile=args.compile,
    )
    if args.report_to:
        kw["report_to"] = tuple(s.strip() for s in args.report_to.split(",") if s.strip())
    if args.no_progress:
        kw["progress"] = False
    return {k: v for k, v in kw.items() if v is not None}


def _add_sampling_args(p):
    """Options of `imagen.diffusion.SamplingConfig`; each dest is the field's name, so `_sampling_config` passes it on."""
    g = p.add_argument_group("sampling")
    g.add_argument("--seed", type=int, default=0, help="random seed; same seed, same pictures (default: 0)")
    g.add_argument("--steps", type=_sampling_steps, default=(DEFAULT_SAMPLING_STEPS, {}), metavar="N | STAGE=N,...",
                   help="sampling steps, for every stage (25) or per stage (base=8,sr1=25, or 25,base=8: a stage not named "
                        "takes the bare count); a stage distilled with `imagen distill --steps` always takes its own DDIM "
                        f"steps (default: {DEFAULT_SAMPLING_STEPS})")
    g.add_argument("--sampler", choices=SAMPLER_NAMES, default=DEFAULT_SAMPLER, help=f"sampler, except at a stage distilled with --steps (DDIM) (default: {DEFAULT_SAMPLER})")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default: 0)")
    g.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help=f"classifier-free guidance scale, 1 = off (default: {DEFAULT_GUIDANCE:g})")
    g.add_argument("--negative", default=None, help="negative prompt")
    g.add_argument("--compose", action="store_true", help="read each prompt as parts joined by AND (\"a red circle AND a "
                   "blue square\") and sample their conjunction (composable diffusion): a step costs parts + 1 U-Net calls")
    g.add_argument("--threshold", choices=THRESHOLD_NAMES, default=DEFAULT_THRESHOLD, help=f"clipping of the predicted image at each step (default: {DEFAULT_THRESHOLD})")
    g.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE, help=f"dynamic thresholding's percentile of |pred_x0| (default: {DEFAULT_PERCENTILE:g})")
    g.add_argument("--aug-level", type=float, default=DEFAULT_AUG_LEVEL, help=f"noise-augmentation level of the low-res image at each SR stage (default: {DEFAULT_AUG_LEVEL:g})")
    g.add_argument("--batch-size", type=_positive_int, default=DEFAULT_SAMPLING_BATCH_SIZE, help=f"samples denoised at once; bounds memory, the images do not depend on it (default: {DEFAULT_SAMPLING_BATCH_SIZE})")


def _sampling_config(args):
    """The SamplingConfig of the parsed options (validated there, once)."""
    import dataclasses

    from imagen.api import SamplingConfig

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingConfig) if hasattr(args, f.name)}
    steps, stage_steps = given.pop("steps")
    return SamplingConfig(**given, steps=DEFAULT_SAMPLING_STEPS if steps is None else steps, stage_steps=stage_steps)


def _sizes(text):
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--sizes {text!r} must be comma-separated integers, e.g. 16,32") from None


def _names(text, option):
    """A comma list of names, or None when the option was not given."""
    if text is None:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ConfigError(f"{option} {text!r} names nothing; give a comma list, e.g. base,sr1")
    return names


def _floats(text, option):
    """A comma list of numbers, or None when the option was not given."""
    if text is None:
        return None
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"{option} {text!r} must be comma-separated numbers, e.g. 1,6") from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="imagen", description="Imagen: multimodal pretraining, fine-tuning and text-to-image diffusion.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser, metavar="COMMAND")

    p = sub.add_parser("data", help="write a built-in dataset to disk")
    dsub = p.add_subparsers(dest="dataset", required=True, parser_class=OneLineParser, metavar="DATASET")
    s = dsub.add_parser("shapes", help="write a Shapes dataset: PNGs + annotations.jsonl")
    s.add_argument("--out", required=True, help="directory to create")
    s.add_argument("--n", type=_positive_int, default=1000, help="number of images (default: 1000)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.add_argument("--size", type=_positive_int, default=32, help="canvas size in pixels (default: 32)")
    s.add_argument("--lang", choices=("en", "zh"), default="en", help="caption language (default: en)")
    s.add_argument("--max-objects", type=int, choices=(1, 2, 3), default=3, help="objects per image, at most (default: 3)")

    p = sub.add_parser("pretrain", help="self-supervised multimodal pretraining (MLM, MIM, ITC, ITM)")
    _add_data_args(p)
    _add_train_args(p)
    p.add_argument("--image-only", action="store_true", help="ignore captions: masked image modelling only")
    p.add_argument("--vocab-size", type=_positive_int, default=1024, help="BPE vocabulary size (default: 1024)")

    p = sub.add_parser("finetune", help="fine-tune a task head on labelled data")
    p.add_argument("--task", required=True, help="task to train: " + ", ".join(FINETUNE_TASKS))
    _add_data_args(p)
    _add_train_args(p, recipe_note="the task's recipe, `recipe` in imagen/tasks/<task>.py")
    p.add_argument("--init-from", default=None, help="a pretraining (or fine-tuning) run to start from")
    p.add_argument("--freeze", default="none", help="none, encoder (head only), or all-but-last-N (default: none)")
    g = p.add_argument_group("classify options (other tasks: --set TASK.KEY=VALUE)")
    g.add_argument("--label", default=None, help="Shapes label kind: shape, color, color-shape, count (default: color-shape)")
    g.add_argument("--label-smoothing", type=float, default=None, help="cross-entropy label smoothing (default: 0)")
    g.add_argument("--augment", choices=("none", "shift", "shift-flip"), default=None, help="training augmentation: random shifts, and left-right flips (default: none)")

    p = sub.add_parser("tune", help="hyperparameter search on Optuna: TPE, median pruning, a SQLite study (needs the tune extra)")
    p.add_argument("--task", required=True, help="task to tune: " + ", ".join(FINETUNE_TASKS))
    _add_data_args(p)
    g = p.add_argument_group("search")
    g.add_argument("--trials", type=_positive_int, required=True, help="trials the study should hold (finished, pruned or failed), shared by every process on it")
    g.add_argument("--space", default=None, help="a JSON file: option -> [choices] or {\"low\", \"high\", \"log\"} (default: the task's search_space in imagen/tasks/)")
    g.add_argument("--metric", default=None, help="validation metric to optimise (default: the one the task's training monitors, e.g. accuracy)")
    g.add_argument("--timeout-min", type=_positive_float, default=None, help="stop starting trials after this many minutes (default: none)")
    g.add_argument("--storage", default=None, help="SQLAlchemy URL of the study's database, e.g. postgresql://user@host/db for many machines (default: sqlite:///OUT/study.db)")
    _add_train_args(p, recipe_note="the task's recipe", search=True)
    p.add_argument("--init-from", default=None, help="a pretraining (or fine-tuning) run every trial starts from")
    p.add_argument("--freeze", default="none", help="none, encoder (head only), or all-but-last-N (default: none)")
    p.add_argument("--label", default=None, help="classify on Shapes: shape, color, color-shape, count (default: color-shape)")

    p = sub.add_parser("evaluate", help="metrics of a run on a data split")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--data", default=None, help="data to evaluate on (default: the run's training data)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="split (default: test)")
    p.add_argument("--label", default=None, help="label kind for Shapes (default: the run's)")
    p.add_argument("--compare", nargs="*", default=[], metavar="RUN", help="other runs to score on the same labels (e.g. from scratch)")
    p.add_argument("--n", type=_positive_int, default=None, help="cap on samples (default: all)")
    p.add_argument("--on-bad-sample", choices=("skip", "error"), default="skip")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    p = sub.add_parser("predict", help="run a fine-tuned model on image files")
    p.add_argument("--run", required=True, help="run directory of a fine-tuned model")
    p.add_argument("--top-k", type=_positive_int, default=1, help="labels / answers / texts to show per file (default: 1)")
    p.add_argument("--question", default=None, help="vqa: the question to answer about each image")
    p.add_argument("--instruction", default=None, help="instruct: the instruction, e.g. \"Describe the image.\"")
    p.add_argument("--texts", nargs="+", default=None, metavar="TEXT", help="retrieval: candidate texts or labels to rank, after the image files (default: the run's zero-shot labels)")
    p.add_argument("--decoding", default=None, help="caption / instruct: greedy, beam or sample (default: the run's)")
    p.add_argument("--out-dir", default=None, help="detect: folder for copies of the images with their boxes drawn")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.add_argument("files", nargs="+", metavar="FILE", help="image files")

    p = sub.add_parser("train-t2i", help="train the text-to-image cascade (base + super-resolution stages)")
    _add_data_args(p)
    _add_train_args(p, batch_size=32, steps_note=f"{DEFAULT_T2I_STEPS['base']} base, {DEFAULT_T2I_STEPS['sr']} per SR stage",
                    image_size=False)
    p.add_argument("--stage", default=None, help="train only this stage (base, sr1, ...) (default: every stage)")
    p.add_argument("--sizes", default="16,32", help="resolution of each stage, base first (default: 16,32)")
    p.add_argument("--text-encoder", default="minilm", help="minilm (frozen all-MiniLM-L6-v2), trainable (a small Transformer trained with the U-Nets), an imagen pretraining run, or a local Hugging Face model folder (default: minilm)")
    p.add_argument("--sr-max-steps", type=_positive_int, default=None, help=f"optimiser steps for super-resolution stages (default: --max-steps when given, else {DEFAULT_T2I_STEPS['sr']})")
    p.add_argument("--sample-every", type=_positive_int, default=None, help="write a sample grid every N steps (default: 4 per stage)")
    p.add_argument("--captions", choices=CAPTION_MODES, default=DEFAULT_T2I_CAPTIONS, help=f"all: each visit of an image draws one of its captions (rows about one image, Shapes paraphrases); first: only its first caption (default: {DEFAULT_T2I_CAPTIONS})")

    p = sub.add_parser("distill", help="guidance-distil a finished text-to-image run: one U-Net call per sampling step")
    p.add_argument("run", metavar="RUN", help="a finished text-to-image run (the teacher)")
    _add_train_args(p, lr=DEFAULT_DISTILL_LR, batch_size=32, steps_note=f"{DEFAULT_DISTILL_STEPS} per stage", image_size=False,
                    model_options=False)
    p.add_argument("--steps", type=_positive_int, default=None, help="progressive distillation: halve each distilled stage's DDIM steps, "
                   f"phase by phase (--max-steps each, default {DEFAULT_PROGRESSIVE_PHASE_STEPS}), from {DEFAULT_PROGRESSIVE_START_STEPS} "
                   "(or the run's own count) down to N, which then samples with N U-Net calls (default: guidance distillation only)")
    p.add_argument("--from-steps", type=_positive_int, default=None, help="with --steps: the DDIM steps of the first phase's teacher "
                   f"(default: {DEFAULT_PROGRESSIVE_START_STEPS}, or the run's own count when it is distilled with --steps already)")
    p.add_argument("--stages", default=None, help=f"comma list of stages to distil, e.g. base,sr1; the others are copied (default: {','.join(DEFAULT_DISTILL_STAGES)})")
    p.add_argument("--guidance-range", default=None, metavar="LOW,HIGH", help="guidance scales the student learns, drawn uniformly; "
                   f"sampling then accepts any in this range (default: {DEFAULT_DISTILL_GUIDANCE_RANGE[0]:g},{DEFAULT_DISTILL_GUIDANCE_RANGE[1]:g})")
    p.add_argument("--sample-every", type=_positive_int, default=None, help="write a sample grid every N steps (default: 4 per stage)")
    p.add_argument("--on-bad-sample", choices=("skip", "error"), default="skip", help="skip unreadable training samples (named in a warning) or stop (default: skip)")

    p = sub.add_parser("generate", help="sample images from text with a trained cascade")
    p.add_argument("--run", required=True, help="text-to-image run directory")
    p.add_argument("prompt", nargs="?", default=None, help="the text prompt (or use --prompts FILE)")
    p.add_argument("--prompts", default=None, help="a text file with one prompt per line, or - for standard input (blank lines are skipped)")
    p.add_argument("--out", default=None, help="PNG file for a grid of all samples (with a single prompt)")
    p.add_argument("--out-dir", default=None, help="folder for one PNG per (prompt, sample) plus index.jsonl")
    p.add_argument("--n", type=_positive_int, default=4, help="samples per prompt (default: 4)")
    _add_sampling_args(p)
    p.add_argument("--stage", default=None, help="stop after this stage (e.g. base) (default: the whole cascade)")
    p.add_argument("--init-image", default=None, help="image-to-image: start from this image")
    p.add_argument("--strength", type=float, default=DEFAULT_STRENGTH, help=f"image-to-image: share of the steps to run (default: {DEFAULT_STRENGTH:g})")
    p.add_argument("--mask", default=None, help="inpainting: a mask image, white where pixels are regenerated (needs --init-image)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")

    p = sub.add_parser("evaluate-t2i", help="score a text-to-image run: compositional accuracy, FID, alignment")
    p.add_argument("--run", required=True, help="text-to-image run directory")
    p.add_argument("--data", default="shapes", help="shapes (compositional accuracy + FID) or other data (FID) (default: shapes)")
    p.add_argument("--n-per-category", type=_positive_int, default=50, help="held-out prompts per category: single, relation, count, and (default: 50)")
    _add_sampling_args(p)
    p.add_argument("--fid-samples", type=_positive_int, default=500, help="test images for FID (default: 500)")
    p.add_argument("--alignment-run", default=None, help="a pretraining run whose contrastive heads score text-image alignment")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    p = sub.add_parser("serve", help="an HTTP API and web page over finished runs (needs the serve extra)")
    p.add_argument("--run", dest="runs", action="append", default=[], metavar="RUN", help="a finished run to serve (repeat for more); requests name it by its folder name")
    p.add_argument("--registry", dest="registries", action="append", default=[], metavar="models/NAME", help="a model registry to serve under its folder name, following its current version as refreshes promote new ones (repeat for more)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 opens it to the network (default: 127.0.0.1)")
    p.add_argument("--port", type=_positive_int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-batch", type=_positive_int, default=DEFAULT_SERVE_MAX_BATCH, help=f"samples or images run together at most (default: {DEFAULT_SERVE_MAX_BATCH})")
    p.add_argument("--max-wait-ms", type=float, default=DEFAULT_SERVE_MAX_WAIT_MS, help=f"how long a batch waits for requests to join it, 0 = no batching wait (default: {DEFAULT_SERVE_MAX_WAIT_MS:g})")
    p.add_argument("--queue", type=_positive_int, default=DEFAULT_SERVE_QUEUE, help=f"waiting requests before new ones get 429 (default: {DEFAULT_SERVE_QUEUE})")
    p.add_argument("--timeout-s", type=_positive_float, default=DEFAULT_SERVE_TIMEOUT_S, help=f"seconds before a request gets 504 and is dropped (default: {DEFAULT_SERVE_TIMEOUT_S:g})")
    p.add_argument("--api-key-env", default=None, metavar="VAR", help="environment variable holding the API key that every /v1/* request must send as Authorization: Bearer KEY (default: no key)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")

    p = sub.add_parser("registry", help="versioned models: create a registry from a finished run, or show one")
    rsub = p.add_subparsers(dest="registry_command", required=True, parser_class=OneLineParser, metavar="ACTION")
    r = rsub.add_parser("init", help="create models/NAME whose first version (current) is a copy of RUN")
    r.add_argument("path", metavar="models/NAME", help="the registry folder to create (absent or empty)")
    r.add_argument("--run", required=True, help="a finished fine-tuned run (imagen finetune --out)")
    r = rsub.add_parser("show", help="the versions, which one is current, and the history")
    r.add_argument("path", metavar="models/NAME", help="a registry folder")

    p = sub.add_parser("refresh", help="fine-tune a registry's current version on new data; promote it only if not worse")
    p.add_argument("--registry", required=True, metavar="models/NAME", help="a registry (imagen registry init)")
    p.add_argument("--data", required=True, help="the new data (built-in name or path), in the current version's classes")
    p.add_argument("--holdout", default=None, help="data whose test split scores current and candidate (default: --data's test split)")
    p.add_argument("--replay", type=float, default=DEFAULT_REFRESH_REPLAY, help=f"share of training examples drawn back from the data the current version was trained on (default: {DEFAULT_REFRESH_REPLAY:g})")
    p.add_argument("--metric", default=None, help="the metric that decides, higher is better (default: the task's headline, e.g. accuracy)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_REFRESH_TOLERANCE, help=f"promote when the candidate scores at least current minus this (default: {DEFAULT_REFRESH_TOLERANCE:g})")
    g = p.add_argument_group("training (default: as the current version was trained)")
    g.add_argument("--max-steps", type=_positive_int, default=None, help="optimiser steps")
    g.add_argument("--epochs", type=_positive_int, default=None, help="epochs over the mixed training data")
    g.add_argument("--lr", type=_positive_float, default=None, help="peak learning rate")
    g.add_argument("--batch-size", type=_positive_int, default=None, help="batch size")
    g.add_argument("--seed", type=int, default=None, help="random seed (data splits, replay draw, training)")
    g.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--on-bad-sample", choices=("skip", "error"), default="skip")
    p.add_argument("--json", action="store_true", help="print the history entry as one JSON object on the last line")

    p = sub.add_parser("report", help="one self-contained HTML page: config, curves, evaluations, samples; runs side by side")
    p.add_argument("run", metavar="RUN", help="a run directory (any task, text-to-image included)")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN", help="other runs shown beside it, on the same plots")
    p.add_argument("--out", default=None, help="the HTML file to write (default: RUN/report.html)")

    p = sub.add_parser("export", help="a finished run as ONNX graphs (checked with onnxruntime) or a Hugging Face style folder")
    p.add_argument("run", metavar="RUN", help="a finished run directory (classify, retrieval or text-to-image for onnx; any for hf)")
    p.add_argument("--format", required=True, metavar="{onnx,hf}", help="onnx: the model with its task head (text-to-image: one U-Net step per stage), dynamic batch; hf: config.json + model.safetensors + model card, for ImagenModel.from_pretrained / imagen.load")
    p.add_argument("--out", required=True, help="folder to create (absent or empty)")

    p = sub.add_parser("demo", help="the whole pipeline on built-in data, small enough for a CPU")
    p.add_argument("--out", default=None, help="directory for the demo's runs (default: runs/demo-<time>)")
    p.add_argument("--fast", action="store_true", help="a much shorter demo (a smoke test)")
    return parser


def _report_stages(results: dict, resume_command: str, done: str = "") -> int | None:
    """Print each trained stage's outcome; at the first interrupted one, how to continue, and its exit code (None when
    every stage finished). Only rank 0 of several processes prints."""
    for name, result in results.items():
        if result.status == "interrupted":
            if os.environ.get("RANK", "0") == "0":
                print(f"stage {name} interrupted ({result.stopped_by or 'SIGINT'}) at step {result.step}; checkpoint saved. "
                      f"Continue with: {resume_command}", file=sys.stderr)
            return _exit_code(result.stopped_by)
        print(f"stage {name}: {done}{result.status} at step {result.step}")
    return None


def _exit_code(signal_name: str | None) -> int:
    """The shell's convention for a process stopped by a signal: 128 + its number (SIGINT 130, SIGTERM 143)."""
    return 128 + (signal.SIGTERM if signal_name == "SIGTERM" else signal.SIGINT)


def _report_fit(result, out, command):
    if result.status == "interrupted":
        if os.environ.get("RANK", "0") != "0":  # one report per job: rank 0's
            return _exit_code(result.stopped_by)
        print(f"interrupted ({result.stopped_by or 'SIGINT'}) at step {result.step}; checkpoint saved. "
              f"Continue with: {command} --out {out} --resume", file=sys.stderr)
        return _exit_code(result.stopped_by)
    print(f"{result.status} at step {result.step}; run saved to {out}" + (f" (best {result.best_metric:.4f} at step {result.best_step})" if result.best_metric is not None else ""))
    return 0


def _serve(args) -> int:
    key = None
    if args.api_key_env is not None:
        key = os.environ.get(args.api_key_env, "")
        if not key:
            raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    try:
        from imagen.serve import BatchSettings, ServeSettings, serve
    except ImportError as e:
        raise ConfigError(f"imagen serve needs the serve extra ({e.name} is missing): pip install -e \".[serve]\"") from None
    batch = BatchSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue=args.queue, timeout_s=args.timeout_s)
    # uvicorn handles SIGTERM itself (stop accepting, finish the requests in flight) and then raises it again under
    # the handler it found: ignored, so a SIGTERM'd server exits 0.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return serve(args.runs, ServeSettings(batch=batch, api_key=key, device=args.device), host=args.host, port=args.port,
                 registries=args.registries)


def _tune(args) -> int:
    try:
        from imagen.tune import TuneSettings, load_space, tune
    except ImportError as e:
        raise ConfigError(f"imagen tune needs the tune extra ({e.name} is missing): pip install -e \".[tune]\"") from None
    space = load_space(args.space) if args.space is not None else None
    fixed = {**_train_kwargs(args), "progress": False, "preset": args.preset, "n": args.n, "on_bad_sample": args.on_bad_sample,
             "sets": tuple(args.sets), "init_from": args.init_from, "freeze": args.freeze, "label": args.label}
    settings = TuneSettings(task=args.task, data=args.data, out=Path(args.out), trials=args.trials, space=space,
                            metric=args.metric, timeout_min=args.timeout_min, storage=args.storage, resume=args.resume,
                            seed=args.seed or 0, fixed={k: v for k, v in fixed.items() if v is not None})
    tune(settings)
    return 0


def run_command(args) -> int:
    import imagen.api as api

    if args.command == "data":
        path = api.write_shapes(args.out, n=args.n, seed=args.seed, size=args.size, lang=args.lang, max_objects=args.max_objects)
        print(f"wrote {args.n} images and annotations.jsonl to {path}")
        return 0
    if args.command == "pretrain":
        result = api.pretrain(args.data, args.out, preset=args.preset, resume=args.resume, image_only=args.image_only,
                              vocab_size=args.vocab_size, n=args.n, on_bad_sample=args.on_bad_sample, sets=args.sets, **_train_kwargs(args))
        return _report_fit(result, args.out, "imagen pretrain")
    if args.command == "finetune":
        # The classify flags are that task's options; given to another task, the library names the mistake.
        task_options = dict(label=args.label, label_smoothing=args.label_smoothing, augment=args.augment)
        result = api.finetune(args.task, args.data, args.out, init_from=args.init_from, preset=args.preset, freeze=args.freeze,
                              resume=args.resume, n=args.n, on_bad_sample=args.on_bad_sample, sets=args.sets,
                              **{k: v for k, v in task_options.items() if v is not None}, **_train_kwargs(args))
        return _report_fit(result, args.out, f"imagen finetune --task {args.task}")
    if args.command == "evaluate":
        echo = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
        result = api.evaluate(args.run, args.data, split=args.split, label=args.label, compare=args.compare, n=args.n,
                              on_bad_sample=args.on_bad_sample, echo=echo)
        if args.json:
            print(json.dumps(result))
        return 0
    if args.command == "predict":
        inputs = {k: v for k, v in dict(question=args.question, instruction=args.instruction, texts=args.texts,
                                         decoding=args.decoding, out_dir=args.out_dir).items() if v is not None}
        for r in api.predict(args.run, args.files, top_k=args.top_k, **inputs):
            if args.json:
                print(json.dumps(r, ensure_ascii=False))
            elif "label" in r and "probability" in r:
                print(f"{r['file']}\t{r['label']}\t{r['probability']:.4f}" + "".join(f"\t{t['label']}:{t['probability']:.3f}" for t in r["top"][1:]))
            else:
                print(r["file"] + "\t" + r.get("summary", json.dumps({k: v for k, v in r.items() if k != "file"}, ensure_ascii=False)))
        return 0
    if args.command == "train-t2i":
        results = api.train_t2i(args.data, args.out, stage=args.stage, sizes=_sizes(args.sizes), text_encoder=args.text_encoder,
                            resume=args.resume, n=args.n, sr_max_steps=args.sr_max_steps, sample_every=args.sample_every,
                            on_bad_sample=args.on_bad_sample, captions=args.captions, sets=args.sets, **_train_kwargs(args))
        code = _report_stages(results, f"imagen train-t2i --out {args.out} --resume")
        if code is None:
            print(f"run saved to {args.out}; sample with: imagen generate --run {args.out} \"PROMPT\" --out grid.png")
        return code or 0
    if args.command == "distill":
        if args.from_steps is not None and args.steps is None:
            raise ConfigError("--from-steps sets where progressive distillation starts; give --steps N as well")
        distill = api.distill_t2i if args.steps is None else functools.partial(api.progressive_distill_t2i, steps=args.steps,
                                                                                       start_steps=args.from_steps)
        results = distill(args.run, args.out, stages=_names(args.stages, "--stages"), resume=args.resume,
                          guidance_range=_floats(args.guidance_range, "--guidance-range"), sample_every=args.sample_every,
                          on_bad_sample=args.on_bad_sample, **_train_kwargs(args))
        steps = "" if args.steps is None else f" --steps {args.steps}" + (f" --from-steps {args.from_steps}" if args.from_steps else "")
        code = _report_stages(results, f"imagen distill {args.run} --out {args.out}{steps} --resume", done="distilled, ")
        if code is None:
            if args.steps is None:  # the measured route: guidance-distilled stages at 8 steps (README, "8 U-Net calls")
                distilled = json.loads((Path(args.out) / "config.json").read_text())["distillation"]["stages"]
                few = ",".join(f"{name}=8" for name in distilled)
                print(f"run saved to {args.out}; it samples with one U-Net call per step at its distilled stages, 8 steps "
                      f"measured enough on Shapes: imagen generate --run {args.out} --steps 25,{few} \"PROMPT\" --out grid.png")
            else:
                print(f"run saved to {args.out}; it samples with {args.steps} DDIM steps of one U-Net call at its distilled "
                      f"stages: imagen generate --run {args.out} \"PROMPT\" --out grid.png")
        return code or 0
    if args.command == "generate":
        prompts = api.read_prompts(args.prompt, args.prompts)
        config = _sampling_config(args)
        files = api.generate_to_files(args.run, prompts, config, out=args.out, out_dir=args.out_dir, stage=args.stage,
                                  init_image=args.init_image, mask=args.mask, device=args.device)
        print(f"wrote {files[0] if args.out else args.out_dir} ({len(prompts)} prompt(s) x {config.n} sample(s))")
        return 0
    if args.command == "evaluate-t2i":
        echo = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
        config = _sampling_config(args)
        aligner = api.load(args.alignment_run) if args.alignment_run else None
        result = api.evaluate_t2i(args.run, args.data, config, n_per_category=args.n_per_category, fid_samples=args.fid_samples,
                              aligner=aligner, device=args.device, echo=echo)
        if args.json:
            print(json.dumps(result))
        return 0
    if args.command == "serve":
        return _serve(args)
    if args.command == "registry":
        if args.registry_command == "init":
            api.init_registry(args.path, args.run)
            return 0
        reg = api.Registry.open(args.path)
        current = reg.current()
        for version in reg.versions():
            print(f"{version}{'  (current)' if version == current else ''}")
        for entry in reg.history():
            print(f"{entry['time']}  {entry['event']:8s} {entry['version']}  {entry.get('decision', '')}: {entry.get('reason', '')}")
        return 0
    if args.command == "refresh":
        options = {k: v for k, v in dict(max_steps=args.max_steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                         seed=args.seed, device=args.device).items() if v is not None}
        if args.no_progress:
            options["progress"] = False
        entry = api.refresh(args.registry, args.data, holdout=args.holdout, replay=args.replay, metric=args.metric,
                        tolerance=args.tolerance, on_bad_sample=args.on_bad_sample, **options)
        if args.json:
            print(json.dumps(entry))
        return 0
    if args.command == "report":
        print(f"wrote {api.write_report(args.run, args.compare, args.out)}")
        return 0
    if args.command == "export":
        api.export_run(args.run, args.format, args.out)
        return 0
    if args.command == "tune":
        return _tune(args)
    if args.command == "demo":
        from imagen.demo import run_demo

        return run_demo(args.out, fast=args.fast)
    raise AssertionError(args.command)


def _launch(args, argv) -> int:
    """`--nproc N`: the same command as N processes (torchrun's launcher), each without --nproc."""
    if args.batch_size is not None and args.batch_size % args.nproc:
        raise ConfigError(f"--batch-size {args.batch_size} is the global batch and must split evenly over --nproc "
                          f"{args.nproc}; use a multiple of {args.nproc}")
    import imagen.api as api

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    return api.launch_processes(args.nproc, rest)


def _rank_prefix() -> str:
    """"rank R: " inside a multi-process job (launched by torchrun or --nproc), else nothing."""
    return f"rank {os.environ.get('RANK', '0')}: " if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""


def _lost_peer(e: BaseException) -> bool:
    """A collective failed because another process of the job died (its own error is the one to read)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or not isinstance(e, RuntimeError):
        return False
    # torch.distributed's own errors (DistError and its subclasses), or a backend's message about a lost peer; an
    # error of this process's own (out of memory, a shape mismatch) is not one of them.
    return (type(e).__module__.startswith("torch.distributed") or type(e).__name__.startswith("Dist")
            or any(w in str(e) for w in ("Gloo", "gloo", "NCCL", "closed by peer", "Connection reset")))


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="imagen: %(message)s", stream=sys.stderr)
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors and --help: argparse has printed its line already
        return int(e.code or 0)
    if (getattr(args, "nproc", None) or 1) > 1 and "WORLD_SIZE" not in os.environ:
        try:
            return _launch(args, argv)
        except USER_ERRORS as e:
            print(f"imagen {args.command}: error: {e}", file=sys.stderr)
            return 2
    if _rank_prefix() and os.environ.get("RANK") != "0":
        # One job, one report: ranks other than 0 print only their errors.
        logging.getLogger().setLevel(logging.WARNING)
        sys.stdout = open(os.devnull, "w")
    # SIGTERM (docker stop, Kubernetes, Slurm, systemd) stops a command the way Ctrl-C does: a run being set up is
    # removed, a run training checkpoints (the trainer handles both signals itself while it trains).
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        code = run_command(args)
        if _rank_prefix() and code in (0, 130, 143):  # every rank got here: leave the process group together
            import imagen.api as api

            api.finish_processes()
        return code
    except USER_ERRORS as e:
        if getattr(e, "raised_on_rank", None) != 0 or os.environ.get("RANK", "0") == "0":  # rank 0 reports its own
            print(f"imagen {args.command}: error: {_rank_prefix()}{e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not _lost_peer(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's source location
        print(f"imagen {args.command}: error: {_rank_prefix()}stopped: another process of the job failed ({first[:200]})",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        name = "SIGTERM" if str(e) == "SIGTERM" else "SIGINT"
        if os.environ.get("RANK", "0") == "0":
            print(f"imagen {args.command}: interrupted ({name})", file=sys.stderr)
        return _exit_code(name)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    sys.exit(main())
