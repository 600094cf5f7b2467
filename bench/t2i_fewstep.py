"""Few-step sampling per cascade stage: how far each sampler at 4-25 steps lands from DPM-Solver++(2M) at 100 steps.

    python bench/t2i_fewstep.py RUN [--prompts N] [--steps 4,6,8,12,25] [--samplers dpmpp2m,dpmpp3m,unipc]
                                    [--accuracy-prompts N] [--device cpu]

Every sample of every configuration starts from the same seeds. Each stage is measured alone: the base stage from
noise, and each super-resolution stage from the same low-res input, the reference sample of the stage below, so
a stage's figures are its own. Per stage, sampler and step count: RMSE against the 100-step reference in 8-bit grey
levels (mean over images, +- its standard error), the paired difference to dpmpp2m at 25 steps (the default), and
the sampling time per image. On a Shapes run it then scores compositional accuracy (the pipeline's evaluator) of the
whole cascade at 8 steps per sampler, against dpmpp2m at 25 steps, and of 25 dpmpp2m base steps followed by 8
super-resolution steps. The question it answers: do the strongly conditioned super-resolution stages hold at 6-8
steps, so that the default can use fewer steps there?
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import subprocess
import sys
import time

import torch

from imagen.config import DEFAULT_GUIDANCE, SAMPLER_NAMES
from imagen.data import load_dataset
from imagen.data.image_files import resize_uint8, to_uint8
from imagen.diffusion import SamplingConfig
from imagen.errors import USER_ERRORS
from imagen.eval import evaluator as evaluator_module
from imagen.eval.t2i import compositional_accuracy, compositional_prompts
from imagen.pipelines import TextToImagePipeline

REFERENCE = ("dpmpp2m", 100)
DEFAULT_SAMPLER_STEPS = ("dpmpp2m", 25)
GREY = 127.5  # [-1, 1] -> 8-bit grey levels


def _prompts(pipe: TextToImagePipeline, n: int) -> list[str]:
    """n prompts: held-out compositional prompts on a Shapes run (all categories), else the test split's captions."""
    spec = str(pipe.config.get("data", {}).get("spec", ""))
    if spec == "shapes":
        rows = compositional_prompts(math.ceil(n / 3), size=32)
        per = len(rows) // 3
        return [rows[c * per + i]["prompt"] for i in range(per) for c in range(3)][:n]  # interleave the categories
    texts = [t for t in load_dataset(spec, "test", seed=pipe.config["data"].get("seed", 0)).texts() if t]
    if not texts:
        sys.exit(f"run {pipe.path}: its data {spec!r} has no captions in its test split to prompt with")
    return (texts * math.ceil(n / len(texts)))[:n]


def _sample_stage(pipe, stage, prompts, config, lowres):
    """One stage alone, config.batch_size prompts at a time; prompt i draws from seed config.seed + i."""
    out = []
    for start in range(0, len(prompts), config.batch_size):
        chunk = prompts[start:start + config.batch_size]
        low = None if lowres is None else lowres[start:start + len(chunk)]
        out.append(pipe._sample_stage(stage, chunk, [(config.seed + start + i, 0) for i in range(len(chunk))], config, low, None, None))
    return torch.cat(out)


def _rmse_per_image(a, b):
    return (a.float() - b.float()).pow(2).flatten(1).mean(1).sqrt() * GREY


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    return v.mean().item(), (v.std().item() / math.sqrt(len(v)) if len(v) > 1 else float("nan"))


def stage_table(pipe, prompts, samplers, steps_list, base_config) -> None:
    """Print one markdown table: per stage, sampler and steps, RMSE to the reference and time per image."""
    lowres = None
    print("| stage | sampler | steps | RMSE vs dpmpp2m@100 (grey levels) | minus dpmpp2m@25 (paired) | s / image |")
    print("| --- | --- | --- | --- | --- | --- |")
    for stage in pipe.stages:
        ref_cfg = dataclasses.replace(base_config, sampler=REFERENCE[0], steps=REFERENCE[1])
        start = time.perf_counter()
        ref = _sample_stage(pipe, stage, prompts, ref_cfg, lowres)
        ref_time = (time.perf_counter() - start) / len(prompts)
        results = {}
        for sampler in samplers:
            for steps in steps_list:
                cfg = dataclasses.replace(base_config, sampler=sampler, steps=steps)
                start = time.perf_counter()
                out = _sample_stage(pipe, stage, prompts, cfg, lowres)
                results[sampler, steps] = (_rmse_per_image(out, ref), (time.perf_counter() - start) / len(prompts))
        default = results.get(DEFAULT_SAMPLER_STEPS)
        for (sampler, steps), (rmse, seconds) in results.items():
            mean, se = _mean_se(rmse)
            diff = "" if default is None else "{:+.2f} +- {:.2f}".format(*_mean_se(rmse - default[0]))
            print(f"| {stage.config.name} | {sampler} | {steps} | {mean:.2f} +- {se:.2f} | {diff} | {seconds:.3f} |", flush=True)
        print(f"| {stage.config.name} | {REFERENCE[0]} | {REFERENCE[1]} | reference | | {ref_time:.3f} |", flush=True)
        lowres = ref  # the next stage starts from this stage's reference samples


def accuracy_table(pipe, samplers, n_per_category, base_config, device) -> None:
    """Compositional accuracy of the whole cascade per configuration (Shapes runs only)."""
    evaluator = evaluator_module.get_evaluator(32, device=device)
    prompts = compositional_prompts(n_per_category, size=32)
    sr = len(pipe.stages) > 1
    configs = [("dpmpp2m", 25, None)] + [(s, 8, None) for s in samplers]
    if sr:
        configs += [("dpmpp2m", 25, (s, 8)) for s in samplers]  # base at the default, the SR stages at 8 steps
    print("\n| base sampler | base steps | SR sampler, steps | compositional | single | relation | count | s / image |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for sampler, steps, sr_override in configs:
        cfg = dataclasses.replace(base_config, sampler=sampler, steps=steps)
        sr_cfg = cfg if sr_override is None else dataclasses.replace(base_config, sampler=sr_override[0], steps=sr_override[1])

        def generate(texts):
            images = None
            for i, stage in enumerate(pipe.stages):
                images = _sample_stage(pipe, stage, texts, cfg if i == 0 else sr_cfg, images)
            return resize_uint8(to_uint8(images), 32)

        start = time.perf_counter()
        r = compositional_accuracy(generate, prompts, evaluator, batch_size=base_config.batch_size)
        seconds = (time.perf_counter() - start) / len(prompts)
        sr_text = "same" if sr_override is None else f"{sr_override[0]}, {sr_override[1]}"
        print(f"| {sampler} | {steps} | {sr_text if sr else '-'} | {r['compositional_accuracy']:.3f} | {r['single_accuracy']:.3f} "
              f"| {r['relation_accuracy']:.3f} | {r['count_accuracy']:.3f} | {seconds:.3f} |", flush=True)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive integers, e.g. 4,6,8")
    return values


def _samplers(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in SAMPLER_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown sampler {unknown[0] if unknown else text!r}; choose from {', '.join(SAMPLER_NAMES)}")
    return names


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a trained text-to-image run")
    p.add_argument("--prompts", type=int, default=24, help="prompts (one sample each) for the RMSE table (default: 24)")
    p.add_argument("--steps", type=_int_list, default=[4, 6, 8, 12, 25], help="step counts (default: 4,6,8,12,25)")
    p.add_argument("--samplers", type=_samplers, default=["dpmpp2m", "dpmpp3m", "unipc"], help="(default: dpmpp2m,dpmpp3m,unipc)")
    p.add_argument("--accuracy-prompts", type=int, default=50, help="prompts per category for compositional accuracy; 0 skips it (default: 50)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.prompts <= 0:
        p.error(f"--prompts must be a positive integer, got {args.prompts}")
    try:
        base_config = SamplingConfig(guidance=args.guidance, batch_size=args.batch_size)
        pipe = TextToImagePipeline.from_run(args.run, device=args.device)
        pipe.check_config(dataclasses.replace(base_config, steps=max(args.steps + [REFERENCE[1]])))
        if DEFAULT_SAMPLER_STEPS[1] not in args.steps and DEFAULT_SAMPLER_STEPS[0] in args.samplers:
            print(f"note: without {DEFAULT_SAMPLER_STEPS[1]} in --steps there is no paired column", file=sys.stderr)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        print(f"run {args.run}, stages {', '.join(pipe.stage_names)}, {args.prompts} prompts, guidance {args.guidance:g}, "
              f"torch threads {torch.get_num_threads()}, commit {commit}\n")
        stage_table(pipe, _prompts(pipe, args.prompts), args.samplers, args.steps, base_config)
        if args.accuracy_prompts > 0 and str(pipe.config.get("data", {}).get("spec", "")) == "shapes":
            accuracy_table(pipe, args.samplers, args.accuracy_prompts, base_config, args.device)
    except USER_ERRORS as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
