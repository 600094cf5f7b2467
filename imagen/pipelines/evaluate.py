"""Evaluating a text-to-image run (what `imagen evaluate-t2i` does): compositional accuracy, FID, alignment."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from imagen.atomic import write_json, write_json_lines
from imagen.data import load_dataset
from imagen.data.image_files import resize_uint8, save_grid, to_uint8
from imagen.diffusion import SamplingConfig
from imagen.eval import evaluator as evaluator_module
from imagen.eval.pixel_check import PixelChecker
from imagen.eval.t2i import alignment_score, compositional_accuracy, compositional_prompts, fid
from imagen.pipelines.text_to_image import TextToImagePipeline
from imagen.train import resolve_device


def evaluate_t2i(run, data: str = "shapes", config: SamplingConfig | None = None, *, n_per_category: int = 50,
                 fid_samples: int = 500, aligner=None, device: str = "auto", batch_size: int = 64, echo=print) -> dict[str, Any]:
    """Compositional accuracy on held-out Shapes prompts, FID against real test images, optional alignment.

    `config` is how images are sampled (one per prompt: its `n` is not used); `aligner` is a loaded pretraining
    run (`imagen.load(path)`) whose contrastive heads score text-image alignment. Results go to RUN/eval/ too (on
    Shapes also t2i-shapes-prompts.jsonl: one line per prompt, what each reader read and how it failed).
    """
    config = config if config is not None else SamplingConfig()
    dev = resolve_device(device)
    pipe = TextToImagePipeline.from_run(run, device=str(dev))
    size = pipe.image_size
    one_each = dataclasses.replace(config, n=1)

    def generate_fn(prompts):
        return to_uint8(pipe.generate(prompts, one_each))

    result: dict[str, Any] = {"run": str(run), "data": str(data), "steps": config.steps, "sampler": config.sampler,
                              "guidance": config.guidance, "image_size": size,
                              "stages": pipe.sampling_plan(config)}  # what each stage ran (a distilled one: its own steps)
    # One evaluator serves both: it reads scenes back, and its features (a network trained only on real Shapes
    # renderings) stand in for Inception's in FID.
    evaluator = evaluator_module.get_evaluator(32, device=str(dev))
    if str(data) == "shapes":
        prompts = compositional_prompts(n_per_category, seed=20_000 + config.seed, size=32)
        # The non-learned pixel reader scores the same pictures, so no figure rests on the learned evaluator alone.
        records: list[dict] = []
        result.update(compositional_accuracy(lambda p: resize_uint8(generate_fn(p), 32), prompts, evaluator,
                                             batch_size=batch_size, cross_check=PixelChecker(), records=records))
        # Every prompt with what each reader read and its failure kind: which prompts fail, and how.
        write_json_lines(Path(run) / "eval" / "t2i-shapes-prompts.jsonl", records)
    test = load_dataset(data, "test", seed=pipe.config["data"].get("seed", 0))
    texts = [t or "" for t in test.texts()][:fid_samples]
    real = test.fast_images(size)[:len(texts)]
    fake = torch.cat([generate_fn(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])
    result["fid"] = fid(real, fake, evaluator)
    result["fid_samples"] = len(texts)
    if aligner is not None:
        result["alignment"] = alignment_score(fake, texts, aligner)
    out_dir = Path(run) / "eval"
    write_json(out_dir / f"t2i-{Path(str(data)).name}.json", result)
    save_grid(fake[:32], out_dir / f"t2i-{Path(str(data)).name}-samples.png", nrow=8)
    for key, value in result.items():
        if isinstance(value, float):
            echo(f"{key:28s} {value:.4f}")
    return result
