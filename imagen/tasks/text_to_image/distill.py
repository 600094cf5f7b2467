"""Guidance distillation of a finished cascade (what `imagen distill` does; Meng et al. 2023, stage 1).

A stage's student is its teacher's U-Net (EMA weights) plus an embedding of the guidance scale w, zero-initialised
so it starts as the teacher's conditional branch. It learns, on the run's own training images and captions, noised
at timesteps drawn as in training, to predict in one call what the teacher's two classifier-free-guidance branches
give at w, for w drawn uniformly from a range. The result is a complete text-to-image run: distilled stages are
trained into it (each a trainer run, so checkpoints, --resume and SIGTERM work as in `train-t2i`), the other
stages are copied, and its config records which stages are `guidance_distilled`, so every command that samples
it makes one U-Net call per step there.

    RUN2/config.json   the teacher's cascade config, distilled stages' configs replaced, plus
                       "distillation": {"teacher": RUN, "stages": [...], "guidance_range": [low, high]}
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from imagen.atomic import write_json
from imagen.config import (DEFAULT_GUIDANCE, DEFAULT_DISTILL_GUIDANCE_RANGE, DEFAULT_DISTILL_LR, DEFAULT_DISTILL_STAGES,
                           DEFAULT_DISTILL_STEPS, PROGRESSIVE_SAMPLER)
from imagen.data import Tokenizer, load_dataset
from imagen.data.image_files import resize_images
from imagen.data.images import normalize_images
from imagen.diffusion import guidance_distillation_loss
from imagen.errors import RunError
from imagen.models.text_encoders import build_text_encoder
from imagen.models.text_to_image import StageConfig, TextToImageStage, check_guidance_range, stage_config_to_json
from imagen.runs import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, check_new_run_dir, open_run
from imagen.tasks.text_to_image.cascade_run import load_stage, read_finished_t2i_config, read_t2i_config
from imagen.tasks.text_to_image.task import T2ISplit, TextToImageTask
from imagen.tasks.text_to_image.training import caption_sets, stage_run_train_config, stage_train_config
from imagen.train import Trainer, TrainResult, current_process, from_main, init_distributed, latest_checkpoint, resolve_device, seed_everything

log = logging.getLogger("imagen")

COPIED_STAGE_FILES = (CONFIG_NAME, WEIGHTS_NAME)  # what a stage that is not distilled brings into the new run


class GuidanceDistillationTask(TextToImageTask):
    """Trains a guidance-conditioned student stage to reproduce its frozen teacher's guided prediction."""

    name = "text-to-image-guidance-distillation"

    def __init__(self, teacher: torch.nn.Module, guidance_range: tuple[float, float], **kwargs):
        super().__init__(**kwargs)
        self.teacher = teacher.requires_grad_(False).eval()  # not the trainer's model: never updated, never saved
        self.guidance_range = guidance_range
        low, high = guidance_range
        self.grid_sampling = {"guidance": min(max(DEFAULT_GUIDANCE, low), high)}  # grids at the default, when it is in range

    def _loss(self, model, batch):
        c = model.config
        d = self._draw(model, batch)  # the draws of training (its caption dropout unused: the student sees the text)
        low, high = self.guidance_range
        x0 = d["x0"]
        guidance = low + (high - low) * d["draws"].uniform().to(x0.device)  # (B,) one scale per sample
        teacher = self.teacher.to(x0.device)
        extra = d["extra"]

        def student(x_t, t, **kw):
            return model.unet(x_t, t, **kw, **extra).float()

        def guided_teacher(x_t, t, **kw):
            # Classifier-free guidance stacks [cond; uncond]: repeat the low-res input for both halves.
            more = {k: torch.cat([v, v]) for k, v in extra.items()}
            return teacher(x_t, t, **kw, **more).float()

        cond = d["cond"]
        null = model.null_condition(x0.shape[0], cond)
        return guidance_distillation_loss(student, guided_teacher, x0, d["t"], cond, null, guidance,
                                          schedule=model.schedule, objective=c.objective, min_snr_gamma=c.min_snr_gamma,
                                          snr_floor=c.snr_floor, noise=d["noise"])


def student_config(teacher: StageConfig, guidance_range: Sequence[float], steps: int | None = None) -> StageConfig:
    """The teacher's stage config, conditioned on the guidance scale and marked guidance-distilled (and, with
    `steps`, progressively distilled to that many DDIM steps). A student learns from its teacher's outputs only, so
    it records no grounding loss."""
    sampling = {"distilled_steps": steps, "distilled_sampler": PROGRESSIVE_SAMPLER} if steps is not None else {}
    return dataclasses.replace(teacher, unet=dataclasses.replace(teacher.unet, guidance_cond=True), guidance_distilled=True,
                               guidance_range=tuple(guidance_range), grounding_weight=0.0, **sampling)


def student_stage(teacher: TextToImageStage, guidance_range: tuple[float, float], steps: int | None = None) -> TextToImageStage:
    """A guidance-conditioned copy of `teacher`: its EMA U-Net's weights (online and EMA copies), the same text
    encoder (frozen), and a zero-initialised guidance embedding (kept as it is when the teacher has one already),
    so it predicts the teacher's conditional branch; `steps` as in `student_config`."""
    tc = teacher.config
    config = student_config(tc, guidance_range, steps)
    # A text encoder trained with the stage is the student's own copy (saved with it), kept as the teacher had it.
    encoder = copy.deepcopy(teacher.text_encoder) if teacher.text_encoder is not None else teacher.encoder
    student = TextToImageStage(config, encoder)
    weights = teacher.ema_unet.state_dict()
    for unet in (student.unet, student.ema_unet):
        missing, unexpected = unet.load_state_dict(weights, strict=False)
        if unexpected or any(not k.startswith("guidance_mlp.") for k in missing):
            raise RunError(f"stage {tc.name}: the teacher's U-Net does not match its config ({(unexpected or missing)[0]})")
    if student.text_encoder is not None:  # fixed, and in eval mode: captions are encoded as at sampling time
        student.text_encoder.requires_grad_(False).eval()
    return student


def _parse_stages(stages: Sequence[str] | None, config: dict[str, Any], run: Path) -> list[str]:
    names = list(stages) if stages else list(DEFAULT_DISTILL_STAGES)
    unknown = [n for n in names if n not in config["stages"]]
    if unknown:
        raise RunError(f"--stages: {run} has no stage {unknown[0]!r}; its stages are {', '.join(config['stages'])}")
    already = [n for n in names if config["stage_configs"][n].get("guidance_distilled")]
    if already:
        raise RunError(f"stage {already[0]!r} of {run} is already guidance-distilled; distil its teacher instead")
    return [n for n in config["stages"] if n in names]  # cascade order


def check_teacher(run: Path) -> dict[str, Any]:
    """The config of a finished text-to-image run, or a one-line RunError."""
    if not run.is_dir():
        raise RunError(f"run directory {run} does not exist; pass a finished `imagen train-t2i` run")
    return read_finished_t2i_config(run)


def _check_start(run: Path, out: Path, resume: bool, stages, guidance_range) -> tuple[dict, list[str], tuple]:
    """Everything checked before anything is written: (teacher config, stages to distil, guidance range)."""
    if resume:
        if not (out / CONFIG_NAME).is_file():
            raise RunError(f"cannot resume: {out} is not a run directory (no {CONFIG_NAME}); start without --resume")
        saved = read_t2i_config(out)
        record = saved.get("distillation")
        if record is None:
            raise RunError(f"{out} is not a distilled run; --resume continues an interrupted `imagen distill`")
        if "steps" in record:
            raise RunError(f"{out} is progressively distilled; continue it with the same --steps {record['steps']} --resume")
        if Path(record["teacher"]).resolve() != run.resolve():
            raise RunError(f"{out} was distilled from {record['teacher']}, not {run}; pass that run")
        changed = [(option, recorded) for option, given, recorded, same in (
            ("--stages", stages, record["stages"], lambda a, b: set(a) == set(b)),
            ("--guidance-range", guidance_range, record["guidance_range"], lambda a, b: [float(v) for v in a] == b))
            if given is not None and not same(given, recorded)]
        if changed:
            option, recorded = changed[0]
            raise RunError(f"--resume continues {out} as it was started ({option} {','.join(map(str, recorded))}); "
                           f"drop {option} or distil into a new --out")
        return check_teacher(run), list(record["stages"]), tuple(record["guidance_range"])
    if out.resolve() == run.resolve():
        raise RunError(f"--out {out} is the teacher run itself; choose a new directory")
    config = check_teacher(run)
    names = _parse_stages(stages, config, run)
    check_new_run_dir(out, when_taken="choose a new directory")
    return config, names, check_guidance_range(guidance_range if guidance_range is not None else DEFAULT_DISTILL_GUIDANCE_RANGE,
                                               "--guidance-range")


def write_new_run(run: Path, out: Path, config: dict[str, Any], students: dict[str, StageConfig],
                  record: dict[str, Any]) -> dict[str, Any]:
    """The new run's config.json (the `students`' stage configs, `record` as its "distillation"), tokenizer and
    copied stages (rank 0 only); returns its config."""
    stage_configs = {**config["stage_configs"], **{name: stage_config_to_json(c) for name, c in students.items()}}
    new = {**config, "stage_configs": stage_configs, "distillation": {"teacher": str(run.resolve()), **record}}
    if (run / TOKENIZER_NAME).is_file():
        shutil.copy2(run / TOKENIZER_NAME, out / TOKENIZER_NAME)
    for name in config["stages"]:
        if name not in students:
            (out / name).mkdir(parents=True, exist_ok=True)
            for file in COPIED_STAGE_FILES:
                shutil.copy2(run / name / file, out / name / file)
    write_json(out / CONFIG_NAME, new)
    return new


def teacher_data(run: Path, config: dict[str, Any], on_bad_sample: str):
    """(tokenizer or None, train dataset, its caption sets, the first 8 validation rows) of the teacher run `run`:
    what a distillation trains on and draws its sample grids from."""
    tokenizer = Tokenizer.load(run / TOKENIZER_NAME) if (run / TOKENIZER_NAME).is_file() else None
    d = config["data"]
    train_ds = load_dataset(d["spec"], "train", seed=d["seed"], n=d.get("n"), on_bad_sample=on_bad_sample)
    texts = caption_sets(train_ds, d.get("captions", "first"))
    val_ds = load_dataset(d["spec"], "val", seed=d["seed"], n=d.get("n"), on_bad_sample=on_bad_sample)
    return tokenizer, train_ds, texts, val_ds.subset(range(min(8, len(val_ds))))  # the fixed prompts of the sample grids


def distill_t2i(
    run: str | Path,
    out: str | Path,
    *,
    stages: Sequence[str] | None = None,
    guidance_range: Sequence[float] | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    sample_every: int | None = None,
    on_bad_sample: str = "skip",
    **train_kwargs,
) -> dict[str, TrainResult]:
    """Guidance-distil the `stages` (default: the base) of the finished text-to-image run `run` into a new run `out`.

    Each student learns the teacher's guided prediction for guidance scales drawn uniformly from `guidance_range`
    (default DEFAULT_DISTILL_GUIDANCE_RANGE) on the run's training data; the other stages are copied. `resume`
    continues an interrupted distillation. Returns each distilled stage's TrainResult.
    """
    run, out = Path(run), Path(out)
    proc = init_distributed(resolve_device(train_kwargs.get("device") or "auto"))
    config, names, guidance_range = from_main(_check_start, run, out, resume, stages, guidance_range)
    with open_run(out, resume=resume, writer=proc.is_main) as run_dir:
        if not resume and proc.is_main:
            students = {n: student_config(StageConfig(**config["stage_configs"][n]), guidance_range) for n in names}
            write_new_run(run, out, config, students, {"stages": names, "guidance_range": list(guidance_range)})
        tokenizer, train_ds, texts, val_ds = teacher_data(run, config, on_bad_sample)
        run_dir.commit()
        encoder = build_text_encoder(config["text_encoder"], tokenizer=tokenizer)
        results = {}
        for name in names:
            if (out / name / WEIGHTS_NAME).is_file():
                log.info("stage %s is already distilled; skipping it", name)
                continue
            teacher = load_stage(run, name, text_encoder=encoder if getattr(encoder, "frozen", True) else None)
            results[name] = train_student(
                out / name, teacher, guidance_range, (train_ds, texts, val_ds), resume, max_steps, DEFAULT_DISTILL_STEPS,
                sample_every, train_kwargs,
                lambda student, every, run_dir, lowres, prompts, teacher=teacher: GuidanceDistillationTask(
                    teacher.ema_unet, tuple(guidance_range), sample_every=every, sample_prompts=prompts, run_dir=run_dir,
                    lowres_source=lowres))
            if results[name].status == "interrupted":
                break
    return results


def train_student(out_dir: Path, teacher: TextToImageStage, guidance_range, data, resume: bool, max_steps,
                  default_steps: int, sample_every, train_kwargs, make_task, steps: int | None = None) -> TrainResult:
    """Train a student of `teacher` (guidance-conditioned; with `steps`, progressively distilled to that many DDIM
    steps) in its own trainer run directory `out_dir`, written by rank 0 alone. `data` is (train_ds, texts, val_ds)
    from `teacher_data`; `make_task(student, sample_every, run_dir, lowres_source, sample_prompts)` builds the
    distillation task. Both distillations share this: train config, seeding, the frozen-encoder split, resume."""
    train_ds, texts, val_ds = data
    main = current_process().is_main
    n = max_steps if max_steps is not None or train_kwargs.get("epochs") is not None else default_steps
    given = {k: v for k, v in train_kwargs.items() if v is not None}
    if max_steps is not None:
        given["max_steps"] = max_steps
    tcfg = stage_run_train_config(
        out_dir, stage_train_config({"lr": DEFAULT_DISTILL_LR, "warmup_steps": 0, **train_kwargs, "max_steps": n}),
        given, stage_config_to_json(student_config(teacher.config, guidance_range, steps)))
    seed_everything(tcfg.seed)  # a new guidance embedding's first layer is drawn at random
    student = student_stage(teacher, guidance_range, steps)
    size = student.config.unet.image_size
    split = T2ISplit(train_ds.fast_images(size), texts, seed=tcfg.seed, trim_text=tcfg.compile == "off")
    split.precompute(student)  # the teacher's encoder, frozen: every caption encoded once
    val_images = val_ds.fast_images(size)

    def lowres_source(_prompts):
        return resize_images(normalize_images(val_images), student.config.lowres_size)

    task = make_task(student, sample_every or max(1, (tcfg.max_steps or 1000) // 4), out_dir if main else None,
                     lowres_source, val_ds.texts())
    what = "" if steps is None else f" from {2 * steps} to {steps} DDIM steps"
    log.info("distilling stage %s%s (guidance %g-%g, %s optimiser steps) into %s", student.config.name, what,
             *guidance_range, tcfg.max_steps, out_dir)
    can_resume = from_main(lambda: resume and latest_checkpoint(out_dir) is not None)
    return Trainer(student, task, split, None, tcfg, out_dir, collate_fn=task.collate).fit(resume=can_resume)
