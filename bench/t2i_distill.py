"""Distillation (`imagen distill`) on Shapes: a distilled run against its teacher, as one Markdown table per run of
this bench, for bench/RESULTS.md, with the CPU model and the commit.

Every row is a way to sample: the teacher's 25-step DPM-Solver++ pictures with guidance are the reference, and each
row gives the U-Net calls and seconds per image, the RMSE of its pictures against the reference's (same prompts,
same noise), accuracy per category read by both readers (learned evaluator / pixel check), FID, and the difference
in accuracy from the reference on the same prompts with its paired standard error (a within-3-points claim needs
it: pairs that agree cancel).

Guidance distillation (the default; `imagen distill RUN`): the student samples with one U-Net call per step where
the teacher takes two. Rows: the reference, the teacher at --steps, the student at --steps, and the teacher's
conditional branch alone (what one call per step gives without distillation; left out when an undistilled stage
runs first, as guidance is one scale for the whole cascade). --steps applies to the distilled --stages only
(`SamplingConfig.stage_steps`); the others keep the reference's steps, so `--stages sr1 --steps 8` measures the
super-resolution stage at 8 calls under the reference's base stage.

    python bench/t2i_distill.py --teacher runs/bench-t2i                  # distil a trained run (copied, not touched)
    python bench/t2i_distill.py --teacher runs/bench-t2i --steps 8        # ... and compare at 8 steps (8 calls)
    python bench/t2i_distill.py --train-max-steps 14000                   # train the teacher first (the default recipe)
    python bench/t2i_distill.py --teacher RUN --stages sr1 --steps 8      # a cascade's SR stage at 8 calls
    python bench/t2i_distill.py --teacher /tmp/demo-full/text-to-image --distill-steps 50 --n-per-category 8 \
        --fid-samples 32 --timing-prompts 8                               # a smoke run, minutes on one core

Progressive distillation (`--progressive N`: `imagen distill --steps N`): rows are the reference, the student at its N
DDIM steps, and the undistilled teacher at N DDIM and N DPM-Solver++ steps.

    python bench/t2i_distill.py --teacher RUN --progressive 8 --distill-steps 1000     # 64 -> 8, three phases
    python bench/t2i_distill.py --teacher RUN --progressive 2 --from-steps 8 --distill-steps 3 --timing-prompts 2  # smoke

Each row's per-prompt readings are kept as OUT/row-K-prompts.jsonl (K from 0, the reference), for differences per
category (`imagen.eval.t2i.paired_accuracy_difference`). `--student RUN2` scores a run already distilled from
--teacher (with --progressive N when it was distilled with --steps N) instead of distilling one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import time
from pathlib import Path

import torch

from imagen.config import DEFAULT_GUIDANCE, DEFAULT_SAMPLING_STEPS
from imagen.pipelines import SamplingConfig, TextToImagePipeline, evaluate_t2i
from imagen.tasks.text_to_image import distill_t2i, progressive_distill_t2i, train_t2i
from imagen.eval.t2i import CATEGORIES, compositional_prompts, paired_accuracy_difference
from imagen.train.device import cpu_name


def timed_generate(pipe: TextToImagePipeline, prompts: list[str], config: SamplingConfig, stop_at=None):
    """`pipe.generate(prompts)` after one warm-up call: (its pictures, wall seconds per image)."""
    pipe.generate(prompts[:1], config, stop_at=stop_at)
    start = time.perf_counter()
    images = pipe.generate(prompts, config, stop_at=stop_at)
    return images, (time.perf_counter() - start) / len(prompts)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=None, help="a finished text-to-image run to distil (copied into --out)")
    p.add_argument("--out", default="runs/bench-distill", help="folder for the teacher copy and the student (replaced)")
    p.add_argument("--train-max-steps", type=int, default=None, help="without --teacher: base steps of the teacher (default: the recipe's)")
    p.add_argument("--train-sr-max-steps", type=int, default=None, help="without --teacher: super-resolution steps (default: the recipe's)")
    p.add_argument("--distill-steps", type=int, default=None, help="distillation steps per stage (default: imagen distill's)")
    p.add_argument("--lr", type=float, default=None, help="distillation learning rate (default: imagen distill's)")
    p.add_argument("--stages", default=None, help="stages to distil (default: base; with --student, the ones it distilled)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="guidance scale of every comparison")
    p.add_argument("--steps", type=int, default=DEFAULT_SAMPLING_STEPS, help="guidance distillation: DPM-Solver++ steps of the teacher and student rows")
    p.add_argument("--n-per-category", type=int, default=200, help="held-out prompts per category for compositional accuracy "
                   "(0: RMSE and timing only)")
    p.add_argument("--fid-samples", type=int, default=500)
    p.add_argument("--timing-prompts", type=int, default=32, help="prompts timed (one image each, one batch)")
    p.add_argument("--progressive", type=int, default=None, metavar="N", help="progressive distillation to N DDIM steps instead")
    p.add_argument("--from-steps", type=int, default=None, help="with --progressive: the first teacher's DDIM steps (default: imagen distill's)")
    p.add_argument("--reference-steps", type=int, default=DEFAULT_SAMPLING_STEPS, help="the teacher's DPM-Solver++ steps of the reference")
    p.add_argument("--student", default=None, help="with --teacher: score this run, already distilled from it (with "
                   "--progressive N: by `imagen distill --steps N`), instead of distilling (copied, not touched)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.student and not args.teacher:
        p.error("--student scores a distilled run against its teacher: give --teacher too")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    out = Path(args.out)
    for option, given in (("--teacher", args.teacher), ("--student", args.student)):
        if given and Path(given).resolve().is_relative_to(out.resolve()):
            p.error(f"{option} {given} lies inside --out {out}, which this bench clears; choose another --out")
    if args.student:  # checked before --out is cleared: a wrong run would print rows that describe another sampling
        config_file = Path(args.student) / "config.json"
        record = json.loads(config_file.read_text()).get("distillation") if config_file.is_file() else None
        if record is None:
            p.error(f"--student {args.student} is not a run made by `imagen distill` (no distillation in its config.json)")
        if record.get("steps") != args.progressive:
            p.error(f"--student {args.student} was distilled with --steps {record.get('steps')}; give --progressive "
                    f"{record.get('steps')}" if record.get("steps") else f"--student {args.student} is guidance-distilled "
                    "only; drop --progressive")
        # the rows sample --steps at the stages it distilled: other --stages would label them wrongly
        if args.stages is not None and set(args.stages.split(",")) != set(record["stages"]):
            p.error(f"--student {args.student} distilled the stages {','.join(record['stages'])}; drop --stages or give those")
        args.stages = ",".join(record["stages"])
    args.stages = args.stages or "base"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    teacher = out / "teacher"  # evaluate-t2i writes into a run's eval/: never into the run we were given
    if args.teacher:
        shutil.copytree(args.teacher, teacher, ignore=shutil.ignore_patterns("checkpoints", "eval", "samples", "tensorboard"))
    else:
        start = time.perf_counter()
        train_t2i("shapes", teacher, max_steps=args.train_max_steps, sr_max_steps=args.train_sr_max_steps, progress=False,
                  device=args.device)
        print(f"teacher trained in {(time.perf_counter() - start) / 60:.1f} min", flush=True)

    student = out / "student"
    stages = args.stages.split(",")
    if args.student:
        shutil.copytree(args.student, student, ignore=shutil.ignore_patterns("eval", "samples", "tensorboard", "phase-*"))
        how = f"the distilled run {args.student}"
    else:
        wall = time.perf_counter()
        if args.progressive:
            progressive_distill_t2i(teacher, student, args.progressive, start_steps=args.from_steps, stages=stages,
                                    max_steps=args.distill_steps, progress=False, device=args.device,
                                    **({"lr": args.lr} if args.lr else {}))
        else:
            distill_t2i(teacher, student, stages=stages, max_steps=args.distill_steps, progress=False, device=args.device,
                        **({"lr": args.lr} if args.lr else {}))
        how = (f"{args.distill_steps or 'default'} optimiser steps{' per phase' if args.progressive else ''}: "
               f"{(time.perf_counter() - wall) / 60:.1f} wall min")

    batch = args.timing_prompts
    reference = SamplingConfig(steps=args.reference_steps, guidance=args.guidance, batch_size=batch)
    rows = [(f"teacher, {args.reference_steps} dpmpp2m steps (reference)", teacher, reference)]  # guided
    if args.progressive:
        n = args.progressive
        kind = f"progressive distillation ({args.stages}) to {n} DDIM steps"
        rows += [  # a progressively distilled stage takes its own DDIM steps whatever the config; the others the reference's
            (f"student, {n} DDIM steps (distilled)", student, reference),
            (f"teacher, {n} DDIM steps", teacher, SamplingConfig(steps=n, sampler="ddim", guidance=args.guidance, batch_size=batch)),
            (f"teacher, {n} dpmpp2m steps", teacher, SamplingConfig(steps=n, guidance=args.guidance, batch_size=batch))]
    else:
        kind = f"guidance distillation ({args.stages})"
        few = {name: args.steps for name in stages}  # the distilled stages at --steps, the others as the reference
        guided = SamplingConfig(steps=args.reference_steps, stage_steps=few, guidance=args.guidance, batch_size=batch)
        if args.steps != args.reference_steps:
            rows.append((f"teacher, {args.steps} dpmpp2m steps", teacher, guided))
        rows.append((f"student, {args.steps} dpmpp2m steps (distilled)", student, guided))
    names = TextToImagePipeline.from_run(teacher).stage_names
    stop_at = [s for s in names if s in stages][-1]
    if not args.progressive and set(names[:names.index(stop_at) + 1]) <= set(stages):
        # guidance is one scale for the whole cascade: this row only where every stage it runs is a distilled one
        rows.append((f"teacher, {args.steps} dpmpp2m steps, conditional branch only (guidance 1)", teacher,
                     dataclasses.replace(guided, guidance=1.0)))
    scored = score(args, rows, stop_at)
    print(f"\nCPU: {cpu_name()}; torch threads {torch.get_num_threads()}; commit {commit}")
    print(f"{kind}, {how}; pictures up to stage {stop_at}, guidance {args.guidance:g}; RMSE against the reference on "
          f"{batch} prompts, seed 0, pixels in [-1, 1]; seconds per image up to {stop_at}, one batch of {batch}\n")
    print_table(args, scored)


def score(args, rows, stop_at: str) -> list[tuple]:
    """Each (name, run, config) row sampled: U-Net calls and seconds per image up to `stop_at`, RMSE of those pictures
    against the first row's (same prompts, same noise), and - unless --n-per-category 0 - the whole cascade's accuracy
    by both readers, FID, and the paired difference in accuracy from the first row on the same prompts."""
    batch = args.timing_prompts
    prompts = [p["prompt"] for p in compositional_prompts(batch // 3 + 1, seed=7)][:batch]
    quiet = lambda *a, **k: None  # noqa: E731
    scored, reference, reference_records = [], None, None
    for i, (name, run, config) in enumerate(rows):
        pipe = TextToImagePipeline.from_run(run, device=args.device)
        with torch.no_grad():
            # seed 0: every row starts from the same noise
            images, seconds = timed_generate(pipe, prompts, config, stop_at=stop_at)
        reference = images if reference is None else reference
        rmse = float((images - reference).square().mean().sqrt())  # pixels in [-1, 1]
        r, delta = None, None
        if args.n_per_category > 0:  # the whole cascade, as `imagen evaluate-t2i` samples it with this config
            r = evaluate_t2i(run, "shapes", config, n_per_category=args.n_per_category, fid_samples=args.fid_samples,
                             device=args.device, echo=quiet)
            per_prompt = run / "eval" / "t2i-shapes-prompts.jsonl"  # rewritten by the next row of the same run: kept
            shutil.copy2(per_prompt, Path(args.out) / f"row-{i}-prompts.jsonl")
            records = [json.loads(line) for line in per_prompt.read_text().splitlines()]
            reference_records = reference_records or records
            delta = {category: [paired_accuracy_difference([a for a in records if category in (None, a["category"])],
                                                           [b for b in reference_records if category in (None, b["category"])],
                                                           reader) for reader in ("evaluator", "pixel")]
                     for category in (None, *CATEGORIES)}  # None: all prompts
        scored.append((name, calls_per_image(pipe, config, stop_at), seconds, rmse, r, delta))
    return scored


def print_table(args, scored: list[tuple]) -> None:
    if args.n_per_category > 0:
        print(f"accuracy (learned evaluator / pixel check) and FID: the whole cascade ({args.n_per_category} held-out prompts "
              f"per category, FID on {args.fid_samples} test images); few-step rows take those steps at the distilled "
              "stages (a progressive teacher's rows: at every stage), the others the reference's; U-Net calls per stage; "
              "difference: all prompts minus the reference on the same prompts, +- 2 standard errors of the paired "
              "difference\n")
    print("| sampling | U-Net calls per image | s/image | RMSE vs reference | single | relation | count | and | all prompts "
          "| difference from the reference | FID |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, calls, seconds, rmse, r, delta in scored:
        cells = ["-"] * 7
        if r:
            cells = [f"{r[k + '_accuracy']:.3f} / {r['pixel_' + k + '_accuracy']:.3f}"
                     for k in ("single", "relation", "count", "and", "compositional")]
            cells.append(_difference(delta[None]))
            cells.append(f"{r['fid']:.2f}")
        print(f"| {name} | {calls} | {seconds:.3f} | {rmse:.3f} | " + " | ".join(cells) + " |", flush=True)
    if args.n_per_category > 0 and len(scored) > 1:
        print("\ndifference from the reference per category (learned evaluator / pixel check), +- 2 standard errors\n")
        print("| sampling | " + " | ".join(CATEGORIES) + " |\n| --- |" + " --- |" * len(CATEGORIES))
        for name, *_, delta in scored[1:]:
            print(f"| {name} | " + " | ".join(_difference(delta[c]) for c in CATEGORIES) + " |")


def _difference(pair) -> str:
    return " / ".join(f"{d:+.3f} +- {2 * se:.3f}" for d, se in pair)


def calls_per_image(pipe: TextToImagePipeline, config: SamplingConfig, stop_at: str) -> str:
    """U-Net evaluations per image of each stage up to `stop_at` ("50 + 8"): its steps (its own, when distilled with
    --steps or named in the config's stage_steps), two per step where classifier-free guidance runs both branches."""
    calls = []
    for stage in pipe.stages:
        c = stage.config
        calls.append(c.sampling(config).steps * (1 if c.guidance_distilled or config.guidance == 1.0 else 2))
        if c.name == stop_at:
            break
    return " + ".join(map(str, calls))


if __name__ == "__main__":
    main()
