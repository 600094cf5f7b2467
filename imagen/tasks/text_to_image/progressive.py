"""Progressive distillation of a finished cascade (what `imagen distill RUN --steps N` does; Salimans & Ho 2022).

Each distilled stage halves its DDIM step count phase by phase, from its teacher's count (DEFAULT_PROGRESSIVE_START_STEPS,
or the count a progressively distilled teacher stage already has) down to N. In a phase the student, initialised as
its teacher, learns to take in one DDIM step what the teacher takes in two (`progressive_distillation_loss`), on
the run's own training images and captions; the finished phase's student is the next phase's teacher.

Guidance. Every student is guidance-conditioned, as after `imagen distill` without --steps, and learns for guidance
scales w drawn uniformly from its range, so its one call per step is the guided prediction. A guidance-distilled
teacher takes w as its input, and its range is the student's (or a narrower --guidance-range). A teacher that is
not guidance-conditioned takes its two steps with classifier-free guidance at w (two branches per call); its
student then gains the guidance embedding in the first phase, so both distillations happen at once, for w in
--guidance-range (default DEFAULT_DISTILL_GUIDANCE_RANGE). Both are the same loss with another teacher callable.

Thresholding. The teacher's steps clip their x0 predictions as sampling does by default (DEFAULT_THRESHOLD at
DEFAULT_PERCENTILE): the student learns the teacher's sampling trajectories, not the raw ODE.

Every finished phase leaves a usable run: its stage is copied to RUN2/<stage>/ and RUN2/config.json records
its step count, so every command that samples RUN2 runs that stage with DDIM at that count (`StageConfig.sampling`).

    RUN2/config.json            the teacher's cascade config, distilled stages' configs replaced, plus
                                "distillation": {"teacher": RUN, "stages": [...], "guidance_range": given or null, "steps": N,
                                                  "from_steps": given or null}
    RUN2/base/                  the last finished phase's stage: config.json, model.safetensors
    RUN2/base/phase-32/         the trainer run of the halving to 32 steps (checkpoints/, metrics.jsonl, samples/)

--resume skips the finished phases and continues the interrupted one from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from imagen.atomic import write_json
from imagen.config import (DEFAULT_DISTILL_GUIDANCE_RANGE, DEFAULT_DISTILL_STAGES, DEFAULT_GUIDANCE,
                           DEFAULT_PERCENTILE, DEFAULT_PROGRESSIVE_PHASE_STEPS, DEFAULT_PROGRESSIVE_START_STEPS,
                           DEFAULT_THRESHOLD, PROGRESSIVE_SAMPLER)
from imagen.diffusion import classifier_free_guidance, progressive_distillation_loss
from imagen.errors import ConfigError, RunError
from imagen.models.text_encoders import build_text_encoder
from imagen.models.text_to_image import StageConfig, TextToImageStage, check_guidance_range
from imagen.runs import CONFIG_NAME, WEIGHTS_NAME, check_new_run_dir, open_run
from imagen.tasks.text_to_image.cascade_run import load_stage, read_t2i_config
from imagen.tasks.text_to_image.distill import check_teacher, student_config, teacher_data, train_student, write_new_run
from imagen.tasks.text_to_image.task import TextToImageTask
from imagen.train import TrainResult, from_main, init_distributed, resolve_device

log = logging.getLogger("imagen")


class ProgressiveDistillationTask(TextToImageTask):
    """Trains a guidance-conditioned student stage to take in one DDIM step what its frozen teacher takes in two."""

    name = "text-to-image-progressive-distillation"

    def __init__(self, teacher: TextToImageStage, steps: int, guidance_range: tuple[float, float], **kwargs):
        super().__init__(sample_steps=steps, **kwargs)
        self.teacher = teacher.ema_unet.requires_grad_(False).eval()  # not the trainer's model: never updated, never saved
        self.teacher_guidance_cond = teacher.config.guidance_distilled
        self.steps = steps  # the student's
        self.guidance_range = guidance_range
        low, high = guidance_range
        self.grid_sampling = {"guidance": min(max(DEFAULT_GUIDANCE, low), high), "sampler": PROGRESSIVE_SAMPLER}

    def _loss(self, model, batch):
        c = model.config
        d = self._draw(model, batch)  # the draws of training (its timestep and caption dropout unused)
        x0, extra, cond = d["x0"], d["extra"], d["cond"]
        step = d["draws"].integers(self.steps).to(x0.device)  # (B,) the student's step index on its grid
        low, high = self.guidance_range
        guidance = low + (high - low) * d["draws"].uniform().to(x0.device)  # (B,) one scale per sample
        teacher_unet = self.teacher.to(x0.device)

        def student(x_t, t, **kw):
            return model.unet(x_t, t, guidance=guidance, **kw, **extra).float()

        if self.teacher_guidance_cond:
            def teacher(x_t, t, **kw):
                return teacher_unet(x_t, t, guidance=guidance, **kw, **extra).float()
        else:
            def branches(x_t, t, **kw):
                # Classifier-free guidance stacks [cond; uncond]: repeat the low-res input for both halves.
                return teacher_unet(x_t, t, **kw, **{k: torch.cat([v, v]) for k, v in extra.items()}).float()

            teacher = classifier_free_guidance(branches, model.null_condition(x0.shape[0], cond),
                                               scale=guidance.view(-1, *([1] * (x0.dim() - 1))))
        return progressive_distillation_loss(student, teacher, x0, step, cond, steps=self.steps, schedule=model.schedule,
                                             objective=c.objective, threshold=DEFAULT_THRESHOLD,
                                             percentile=DEFAULT_PERCENTILE, noise=d["noise"])


def phase_steps(start: int, steps: int, stage: str) -> list[int]:
    """The student step counts of the phases halving `start` down to `steps`, or a one-line ConfigError."""
    ratio = start // steps if 0 < steps < start and start % steps == 0 else 0
    if ratio < 2 or ratio & (ratio - 1):
        choices = [start >> k for k in range(1, start.bit_length()) if (start >> k) << k == start]
        raise ConfigError(f"--steps {steps}: stage {stage} starts from {start} DDIM steps and each phase halves them, so "
                          f"--steps must be one of {', '.join(map(str, choices)) or 'none (it cannot be halved)'}")
    return [start >> k for k in range(1, ratio.bit_length())]


def _plan(config: dict[str, Any], run: Path, names: Sequence[str], steps: int, start_steps, guidance_range) -> dict[str, tuple]:
    """Each stage's (phase step counts, guidance range), checked against its teacher stage."""
    plan = {}
    for name in names:
        c = StageConfig(**config["stage_configs"][name])
        if start_steps is not None and c.distilled_steps not in (None, start_steps):
            raise ConfigError(f"--from-steps {start_steps}: stage {name} of {run} is distilled to {c.distilled_steps} "
                              "steps, where its distillation continues; drop --from-steps")
        start = c.distilled_steps or start_steps or DEFAULT_PROGRESSIVE_START_STEPS
        if 2 * start > c.timesteps:
            raise ConfigError(f"stage {name} has {c.timesteps} timesteps, too few for a teacher of {start} DDIM steps")
        phases = phase_steps(start, steps, name)
        if c.guidance_distilled:
            low, high = c.guidance_range
            given = check_guidance_range(guidance_range, "--guidance-range") if guidance_range is not None else (low, high)
            if not low <= given[0] <= given[1] <= high:
                raise ConfigError(f"--guidance-range {given[0]:g},{given[1]:g} is outside stage {name}'s guidance range "
                                  f"{low:g},{high:g} in {run}; give one inside it, or drop the option")
        else:
            given = check_guidance_range(guidance_range if guidance_range is not None else DEFAULT_DISTILL_GUIDANCE_RANGE,
                                         "--guidance-range")
        plan[name] = (phases, given)
    return plan


def _check_start(run: Path, out: Path, resume: bool, steps: int, start_steps, stages, guidance_range) -> tuple[dict, dict]:
    """Everything checked before anything is written: (teacher config, plan by stage)."""
    for option, value in (("--steps", steps), ("--from-steps", start_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{option} must be a positive integer, got {value!r}")
    if resume:
        if not (out / CONFIG_NAME).is_file():
            raise RunError(f"cannot resume: {out} is not a run directory (no {CONFIG_NAME}); start without --resume")
        record = read_t2i_config(out).get("distillation")
        if record is None or "steps" not in record:
            raise RunError(f"{out} is not a progressively distilled run; --resume --steps continues an interrupted "
                           "`imagen distill --steps`")
        if Path(record["teacher"]).resolve() != run.resolve():
            raise RunError(f"{out} was distilled from {record['teacher']}, not {run}; pass that run")
        given = [float(v) for v in guidance_range] if guidance_range is not None else None
        for option, value, recorded in (("--steps", steps, record["steps"]), ("--from-steps", start_steps, record["from_steps"]),
                                        ("--stages", set(stages) if stages else None, set(record["stages"])),
                                        ("--guidance-range", given, record["guidance_range"])):
            if value is not None and value != recorded:
                shown = ",".join(map(str, recorded)) if isinstance(recorded, list) else recorded
                raise RunError(f"--resume continues {out} as it was started ({option} {shown}); "
                               f"drop {option} or distil into a new --out")
        config = check_teacher(run)
        return config, _plan(config, run, record["stages"], record["steps"], record["from_steps"], record["guidance_range"])
    if out.resolve() == run.resolve():
        raise RunError(f"--out {out} is the teacher run itself; choose a new directory")
    config = check_teacher(run)
    names = list(stages) if stages else list(DEFAULT_DISTILL_STAGES)
    unknown = [n for n in names if n not in config["stages"]]
    if unknown:
        raise RunError(f"--stages: {run} has no stage {unknown[0]!r}; its stages are {', '.join(config['stages'])}")
    plan = _plan(config, run, [n for n in config["stages"] if n in names], steps, start_steps, guidance_range)  # cascade order
    check_new_run_dir(out, when_taken="choose a new directory")
    return config, plan


def _promote(out: Path, name: str, phase_dir: Path) -> None:
    """Make a finished phase the run's stage `name`: its weights and config, and the run's config.json (rank 0)."""
    stage_dir = out / name
    shutil.copy2(phase_dir / WEIGHTS_NAME, stage_dir / WEIGHTS_NAME)
    shutil.copy2(phase_dir / CONFIG_NAME, stage_dir / CONFIG_NAME)
    config = read_t2i_config(out)
    config["stage_configs"][name] = json.loads((phase_dir / CONFIG_NAME).read_text())["stage"]
    write_json(out / CONFIG_NAME, config)


def progressive_distill_t2i(
    run: str | Path,
    out: str | Path,
    steps: int,
    *,
    start_steps: int | None = None,
    stages: Sequence[str] | None = None,
    guidance_range: Sequence[float] | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    sample_every: int | None = None,
    on_bad_sample: str = "skip",
    **train_kwargs,
) -> dict[str, TrainResult]:
    """Progressively distil the `stages` (default: the base) of the finished text-to-image run `run` into a new run
    `out` that samples them with `steps` DDIM steps; the other stages are copied. The first teacher takes `start_steps`
    (default DEFAULT_PROGRESSIVE_START_STEPS; a progressively distilled stage: its own count). Each halving is a phase of
    `max_steps` optimiser steps (default DEFAULT_PROGRESSIVE_PHASE_STEPS); `resume` continues an interrupted run.
    Returns each phase's TrainResult, keyed "<stage>/phase-<steps>"."""
    run, out = Path(run), Path(out)
    proc = init_distributed(resolve_device(train_kwargs.get("device") or "auto"))
    config, plan = from_main(_check_start, run, out, resume, steps, start_steps, stages, guidance_range)
    with open_run(out, resume=resume, writer=proc.is_main) as run_dir:
        if not resume and proc.is_main:
            students = {name: student_config(StageConfig(**config["stage_configs"][name]), rng, phases[0])
                        for name, (phases, rng) in plan.items()}
            write_new_run(run, out, config, students, {"stages": list(plan), "steps": steps, "from_steps": start_steps,
                                                       "guidance_range": None if guidance_range is None else
                                                       [float(v) for v in guidance_range]})
        tokenizer, train_ds, texts, val_ds = teacher_data(run, config, on_bad_sample)
        run_dir.commit()
        encoder = build_text_encoder(config["text_encoder"], tokenizer=tokenizer)
        shared = encoder if getattr(encoder, "frozen", True) else None
        results = {}
        for name, (phases, rng) in plan.items():
            teacher = load_stage(run, name, text_encoder=shared)
            for count in phases:
                phase_dir = out / name / f"phase-{count}"
                if not from_main(lambda: (phase_dir / WEIGHTS_NAME).is_file()):
                    result = train_student(
                        phase_dir, teacher, rng, (train_ds, texts, val_ds), resume, max_steps,
                        DEFAULT_PROGRESSIVE_PHASE_STEPS, sample_every, train_kwargs,
                        lambda student, every, run_dir, lowres, prompts, teacher=teacher, count=count:
                            ProgressiveDistillationTask(teacher, count, tuple(rng), sample_prompts=prompts, sample_every=every,
                                                        run_dir=run_dir, lowres_source=lowres),
                        steps=count)
                    results[f"{name}/phase-{count}"] = result
                    if result.status == "interrupted":
                        return results
                else:
                    log.info("stage %s: the phase to %d steps is finished; skipping it", name, count)
                from_main(_promote, out, name, phase_dir)
                teacher = load_stage(out, name, text_encoder=shared)
    return results
