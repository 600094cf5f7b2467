"""Training the cascade: the default stages, each stage's train config, and `train_t2i` (what `imagen train-t2i` does).

One run directory holds every stage (layout in `cascade_run`); each stage trains as its own trainer run in a
sub-folder, so a stage resumes, or is added later (`--stage NAME`), without touching the others.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from imagen.atomic import write_json
from imagen.config import CAPTION_MODES, DEFAULT_T2I_CAPTIONS, DEFAULT_T2I_STEPS, TrainConfig, apply_overrides, from_dict, to_dict
from imagen.data import Tokenizer, load_dataset
from imagen.data.images import normalize_images
from imagen.data.image_files import resize_images
from imagen.errors import ConfigError, DataError, RunError
from imagen.models.text_encoders import build_text_encoder, text_encoder_from_arg
from imagen.models.text_to_image import StageConfig, TextToImageStage, stage_config_to_json
from imagen.models.unet import unet_preset
from imagen.runs import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, check_resume_changes, check_run_dir, open_run
from imagen.tasks.text_to_image.cascade_run import STAGE_TASK, TASK, read_t2i_config
from imagen.tasks.text_to_image.grounding import check_grounding, image_phrases
from imagen.tasks.text_to_image.task import T2ISplit, TextToImageTask
from imagen.data.registry import recorded_spec
from imagen.train import (Trainer, TrainResult, current_process, from_main, init_distributed, latest_checkpoint,
                          resolve_device, seed_everything)

log = logging.getLogger("imagen")

# What a stage trains with unless the command line says otherwise.
STAGE_TRAIN_DEFAULTS = dict(weight_decay=0.0, batch_size=32, warmup_steps=100, log_every=25)  # the rest: TrainConfig's
BASE_PRESETS = {16: "base16", 32: "base32"}  # base stage size -> U-Net preset (others: base16 at that size)
SR_PRESETS = {32: "sr32", 64: "sr64"}  # super-resolution stage size -> U-Net preset (others: sr32 at that size)


def default_stages(sizes: Sequence[int]) -> list[StageConfig]:
    """A base stage at sizes[0] and one super-resolution stage per further size (sr1, sr2, ...)."""
    stages = []
    for i, size in enumerate(sizes):
        if i == 0:
            unet = unet_preset(BASE_PRESETS.get(size, "base16"), image_size=size)
            # The base stage decides the layout, at nearly pure noise: the SNR floor keeps those steps trained
            # (with Min-SNR alone, Shapes position words were ignored: 0.12 position accuracy, chance for 9 cells).
            stages.append(StageConfig(name="base", unet=unet, snr_floor=1.0))
        else:
            unet = unet_preset(SR_PRESETS.get(size, "sr32"), image_size=size, lowres_cond=True)
            stages.append(StageConfig(name=f"sr{i}", unet=unet, lowres_size=sizes[i - 1]))
    return stages


def stage_train_config(overrides: dict[str, Any]) -> TrainConfig:
    """A stage's TrainConfig: STAGE_TRAIN_DEFAULTS with the given (non-None) values on top."""
    return TrainConfig(**{**STAGE_TRAIN_DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}})


def caption_sets(ds, mode: str) -> list[list[str]]:
    """Each image's captions: all of them ("all"), or only its first ("first")."""
    sets = ds.caption_sets()
    return [cs[:1] for cs in sets] if mode == "first" else sets


def _new_run(out: Path, data: str, sizes: Sequence[int], text_encoder: str, n: int | None, seed: int,
             on_bad_sample: str, captions: str, sets: Sequence[str], write: bool = True):
    """A new cascade's config (and tokenizer), written into `out` when `write` (rank 0); returns (config, train split,
    encoder, captions, tokenizer or None)."""
    if captions not in CAPTION_MODES:
        raise ConfigError(f"--captions {captions!r}: choose one of {', '.join(CAPTION_MODES)}")
    if len(sizes) < 1 or any(s <= 0 or s % 4 for s in sizes) or list(sizes) != sorted(set(sizes)):
        raise ConfigError(f"--sizes {list(sizes)} must be increasing multiples of 4, e.g. 16,32")
    train_ds = load_dataset(data, "train", seed=seed, n=n, on_bad_sample=on_bad_sample)
    if not train_ds.has_text:
        raise DataError(f"data {data!r} has no captions; text-to-image needs image-text pairs")
    texts = caption_sets(train_ds, captions)
    tokenizer = None
    if text_encoder == "trainable":
        tokenizer = Tokenizer.train([t for cs in texts for t in cs], vocab_size=1024)
    encoder = text_encoder_from_arg(text_encoder, tokenizer=tokenizer)
    stage_cfgs = default_stages(sizes)
    for cfg in stage_cfgs:
        cfg.unet = dataclasses.replace(cfg.unet, text_dim=encoder.dim, cond_dim=encoder.dim)
        cfg.text_encoder = encoder.spec()
    apply_overrides({cfg.name: cfg for cfg in stage_cfgs}, list(sets))
    for cfg in stage_cfgs:
        if cfg.grounding_weight > 0:
            check_grounding(train_ds, encoder, cfg.name)
    if tokenizer is not None and write:
        tokenizer.save(out / TOKENIZER_NAME)
    config = {"task": TASK, "stages": [c.name for c in stage_cfgs], "text_encoder": encoder.spec(),
              "data": {"spec": recorded_spec(data), "seed": seed, "n": n, "captions": captions}, "sizes": list(sizes),
              "stage_configs": {c.name: stage_config_to_json(c) for c in stage_cfgs}}
    if write:
        write_json(out / CONFIG_NAME, config)
    return config, train_ds, encoder, texts, tokenizer


def _existing_run(out: Path, resume: bool, stage: str | None) -> bool:
    """Whether `out` holds a cascade to continue (refusing one that may not be continued this way)."""
    exists = (out / CONFIG_NAME).is_file()
    if exists and not (resume or stage is not None):
        read_t2i_config(out)  # another kind of run: say that first
        raise RunError(f"--out {out} already holds a text-to-image run; pass --resume to continue it or --stage NAME to train one stage")
    return exists


def _read_run(out: Path):
    """(config, tokenizer or None) of an existing cascade."""
    return read_t2i_config(out), (Tokenizer.load(out / TOKENIZER_NAME) if (out / TOKENIZER_NAME).is_file() else None)


def _stages_to_train(out: Path, names: list[str], stage: str | None, exists: bool) -> list[str]:
    """The stages of `names` still to train (refusing a run or stage that is already trained)."""
    if stage is not None and (out / stage / WEIGHTS_NAME).is_file():
        raise RunError(f"stage {stage!r} of {out} is already trained; train into a new --out to start over")
    if exists and all((out / name / WEIGHTS_NAME).is_file() for name in names):
        raise RunError(f"{out} is already finished (every stage is trained); generate with it, or train a new run "
                       "into another --out")
    for name in names:
        if (out / name / WEIGHTS_NAME).is_file():
            log.info("stage %s is already trained; skipping it", name)
    return [name for name in names if not (out / name / WEIGHTS_NAME).is_file()]


def train_t2i(
    data: str = "shapes",
    out: str | Path = "runs/t2i",
    *,
    stage: str | None = None,
    sizes: Sequence[int] = (16, 32),
    text_encoder: str = "minilm",
    resume: bool = False,
    n: int | None = None,
    max_steps: int | None = None,
    sr_max_steps: int | None = None,
    sample_every: int | None = None,
    on_bad_sample: str = "skip",
    captions: str = DEFAULT_T2I_CAPTIONS,
    sets: Sequence[str] = (),
    **train_kwargs,
) -> dict[str, TrainResult]:
    """Train the cascade (every stage, or just `stage`) into one run directory; returns per-stage results.

    captions: "all" draws one of each image's captions per visit (rows about one image, Shapes paraphrases);
    "first" keeps only each image's first caption. An existing run continues with `resume`, or with `stage`
    (train a stage it does not have yet). Launched by torchrun, every rank calls this and rank 0 alone writes `out`.
    """
    out = Path(out)
    # A missing device fails before anything is created.
    proc = init_distributed(resolve_device(train_kwargs.get("device") or "auto"))
    exists = from_main(_existing_run, out, resume, stage)
    if not exists:
        from_main(check_run_dir, out, False)
    with open_run(out, resume=exists, writer=proc.is_main) as run:
        if not exists:
            seed = train_kwargs.get("seed") or 0
            config, train_ds, encoder, texts, tokenizer = _new_run(out, data, sizes, text_encoder, n, seed, on_bad_sample,
                                                                   captions, sets, write=proc.is_main)
        else:
            config, tokenizer = from_main(_read_run, out)
            d = config["data"]
            train_ds = load_dataset(d["spec"], "train", seed=d["seed"], n=d.get("n"), on_bad_sample=on_bad_sample)
            encoder = build_text_encoder(config["text_encoder"], tokenizer=tokenizer)
            texts = caption_sets(train_ds, d.get("captions", "first"))  # runs made before the option used "first"
        if stage is not None and stage not in config["stages"]:
            raise RunError(f"{out} has no stage {stage!r}; its stages are {', '.join(config['stages'])}")
        d = config["data"]
        val_ds = load_dataset(d["spec"], "val", seed=d["seed"], n=d.get("n"), on_bad_sample=on_bad_sample)
        val_ds = val_ds.subset(range(min(8, len(val_ds))))  # the fixed prompts of the sample grids, and their images
        names = from_main(_stages_to_train, out, config["stages"] if stage is None else [stage], stage, exists)
        run.commit()
        results = {}
        for name in names:
            results[name] = _train_stage(out / name, StageConfig(**config["stage_configs"][name]), tokenizer, encoder,
                                         train_ds, texts, val_ds, resume, max_steps, sr_max_steps, sample_every,
                                         train_kwargs)
            if results[name].status == "interrupted":
                break
    return results


def _read_stage_config(stage_dir: Path) -> dict | None:
    return json.loads((stage_dir / CONFIG_NAME).read_text()) if (stage_dir / CONFIG_NAME).is_file() else None


def stage_run_train_config(stage_dir: Path, new: TrainConfig, given: dict, stage_json: dict) -> TrainConfig:
    """A stage's train config: `new` for a stage not started yet (its config.json written with `stage_json`), or the
    saved one with the options `given` again, checked against what --resume allows (and written back if changed)."""
    main = current_process().is_main
    saved = from_main(_read_stage_config, stage_dir)
    if saved is None:
        if main:
            stage_dir.mkdir(parents=True, exist_ok=True)
            write_json(stage_dir / CONFIG_NAME, {"task": STAGE_TASK, "stage": stage_json, "train": to_dict(new)})
        return new
    old = from_dict(TrainConfig, saved["train"])
    tcfg = dataclasses.replace(old, **given)
    changes = [(f"train.{k}", v, to_dict(tcfg)[k]) for k, v in to_dict(old).items() if to_dict(tcfg)[k] != v]
    check_resume_changes(changes, stage_dir)
    if changes and main:
        write_json(stage_dir / CONFIG_NAME, {**saved, "train": to_dict(tcfg)})
    return tcfg


def _train_stage(stage_dir: Path, stage_cfg: StageConfig, tokenizer, encoder, train_ds, texts, val_ds, resume: bool,
                 max_steps, sr_max_steps, sample_every, train_kwargs) -> TrainResult:
    """Train (or resume) one stage in its own trainer run directory (written by rank 0 alone)."""
    main = current_process().is_main
    steps = sr_max_steps if (stage_cfg.is_sr and sr_max_steps) else max_steps
    if steps is None and train_kwargs.get("epochs") is None:
        steps = DEFAULT_T2I_STEPS["sr" if stage_cfg.is_sr else "base"]
    given = {k: v for k, v in train_kwargs.items() if v is not None}
    if max_steps is not None or (stage_cfg.is_sr and sr_max_steps):
        given["max_steps"] = steps
    tcfg = stage_run_train_config(stage_dir, stage_train_config({**train_kwargs, "max_steps": steps}), given,
                                  stage_config_to_json(stage_cfg))
    seed_everything(tcfg.seed)
    if stage_cfg.text_encoder.get("kind") == "trainable":
        encoder = build_text_encoder(stage_cfg.text_encoder, tokenizer=tokenizer)  # each stage trains its own copy
    model = TextToImageStage(stage_cfg, encoder)
    size = stage_cfg.unet.image_size
    split = T2ISplit(train_ds.fast_images(size), texts, seed=tcfg.seed, trim_text=tcfg.compile == "off")
    if model.text_encoder is None:
        split.precompute(model)
    if stage_cfg.grounding_weight > 0:  # checked by check_grounding when the run was made
        split.ground(image_phrases(train_ds, size), encoder)
    val_images = val_ds.fast_images(size)

    def lowres_source(_prompts):
        return resize_images(normalize_images(val_images), stage_cfg.lowres_size)

    task = TextToImageTask(sample_every=sample_every or max(1, (tcfg.max_steps or 1000) // 4), sample_prompts=val_ds.texts(),
                           run_dir=stage_dir if main else None, lowres_source=lowres_source)
    log.info("training stage %s (%dx%d, %.2fM parameters) in %s", stage_cfg.name, size, size,
             model.unet.num_parameters() / 1e6, stage_dir)
    can_resume = from_main(lambda: resume and latest_checkpoint(stage_dir) is not None)
    return Trainer(model, task, split, None, tcfg, stage_dir, collate_fn=task.collate).fit(resume=can_resume)
