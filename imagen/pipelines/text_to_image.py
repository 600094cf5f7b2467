"""The text-to-image pipeline: a cascade's stages, their text encoder and the sampler composed in one place.

    pipe = TextToImagePipeline.from_run("runs/t2i", device="cuda")
    images = pipe.generate(["a red circle"], SamplingConfig(n=4, seed=0))   # (4, 3, S, S) in [-1, 1]

Each stage exposes its denoiser (EMA U-Net + low-res input); the pipeline encodes the prompts, takes the stage's
guided denoiser (classifier-free guidance, or one call of a guidance-distilled stage) and runs
`imagen.diffusion.sample`, lowest resolution first, each stage's output the next one's low-res input. A
progressively distilled stage samples with the DDIM steps it was distilled for, whatever the request's steps
and sampler (`StageConfig.sampling`); those apply to the other stages.
`generate_to_files` is what `imagen generate` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from imagen.atomic import write_json_lines
from imagen.data import image_to_tensor, open_image
from imagen.data.images import normalize_images
from imagen.data.image_files import resize_images, save_grid, save_image, to_uint8
from imagen.diffusion import SamplingConfig, make_sampler, sample, sample_generators
from imagen.errors import GenerationError, RunError
from imagen.models.text_to_image import TextToImageStage
from imagen.runs import WEIGHTS_NAME
from imagen.tasks.text_to_image import load_stage, read_t2i_config
from imagen.train import resolve_device
from imagen.train.device import channels_last_pays


@dataclass
class TextToImagePipeline:
    """The loaded stages of a text-to-image run, lowest resolution first, and how to sample them."""

    path: Path
    stages: list[TextToImageStage]
    config: dict[str, Any]  # the run's config.json

    @classmethod
    def from_run(cls, path: str | Path, stages: Sequence[str] | None = None, device: str = "cpu") -> "TextToImagePipeline":
        """Load a text-to-image run's trained stages (all of them, or the named ones, in cascade order)."""
        run = Path(path)
        config = read_t2i_config(run)
        names = list(stages) if stages else [s for s in config["stages"] if (run / s / WEIGHTS_NAME).is_file()]
        if not names:
            raise RunError(f"{run} has no trained stage yet; finish it with `imagen train-t2i --out {run} --resume`")
        unknown = [n for n in names if n not in config["stages"]]
        if unknown:
            raise RunError(f"{run} has no stage {unknown[0]!r}; its stages are {', '.join(config['stages'])}")
        if names[0] != config["stages"][0]:
            raise RunError(f"the cascade must start at its base stage {config['stages'][0]!r}")
        map_location = resolve_device(device)
        frozen, loaded = None, []
        for name in names:
            stage = load_stage(run, name, text_encoder=frozen, map_location=map_location)
            if stage.text_encoder is None:
                frozen = stage.encoder  # frozen encoders are shared, loaded once
            if channels_last_pays(map_location, "fp32"):  # sampling runs in fp32: 1.16-1.24x per U-Net call there
                stage.to(memory_format=torch.channels_last)
            loaded.append(stage)
        return cls(path=run, stages=loaded, config=config)

    @property
    def image_size(self) -> int:
        return self.stages[-1].config.unet.image_size

    @property
    def stage_names(self) -> list[str]:
        return [s.config.name for s in self.stages]

    def generate(self, prompts: Sequence[str], config: SamplingConfig | None = None, *,
                 init_images: torch.Tensor | None = None, inpaint_mask: torch.Tensor | None = None,
                 stop_at: str | None = None) -> torch.Tensor:
        """Images (len(prompts) * config.n, 3, S, S) in [-1, 1], prompt-major; same seed, same images.

        Image-to-image: `init_images` (1 or B, 3, H, W) in [-1, 1], noised and denoised for config.strength of
        the steps. Inpainting: with `inpaint_mask` (1 or B, 1, H, W), 1 where pixels are generated, every step
        runs and the rest of `init_images` is kept. `stop_at` names the last stage to run.
        """
        chunks = self.generate_chunks(prompts, config, init_images=init_images, inpaint_mask=inpaint_mask, stop_at=stop_at)
        return torch.cat([images for _, images in chunks])

    @torch.no_grad()
    def generate_chunks(self, prompts: Sequence[str], config: SamplingConfig | None = None, *,
                        init_images: torch.Tensor | None = None, inpaint_mask: torch.Tensor | None = None,
                        stop_at: str | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """`generate`, `config.batch_size` samples at a time through the whole cascade: yields (first index, images).

        Sample k of a prompt draws its noise from its own generator, seeded from (config.seed, k), so a picture
        depends on its prompt, seed and sample number only, never on the chunking or the other prompts.
        """
        config = config if config is not None else SamplingConfig()
        if stop_at is not None and stop_at not in self.stage_names:
            raise RunError(f"{self.path} has no trained stage {stop_at!r}; trained: {', '.join(self.stage_names)}")
        self.check_config(config, stop_at, prompts)
        if inpaint_mask is not None:
            config = dataclasses.replace(config, strength=1.0)  # inpainting runs every step
        rows = [(p, config.seed, k) for p in prompts for k in range(config.n)]  # prompt-major
        yield from self._generate_rows(rows, config, init_images, inpaint_mask, stop_at)

    def generate_rows(self, rows: Sequence[tuple[str, int, int]], config: SamplingConfig | None = None, *,
                      progress: Callable[[str, int, int], None] | None = None) -> torch.Tensor:
        """Images (len(rows), 3, S, S) in [-1, 1] for (prompt, seed, sample) rows, `config.batch_size` at a time.

        Row (p, s, k) is the picture `generate([p], SamplingConfig(seed=s, ...))` makes as its sample k, so requests
        with their own seeds can share a batch (the server's dynamic batching); config.seed and config.n are unused.
        `progress(stage, step, steps)` is called after every sampling step of every stage (step counts from 1).
        """
        config = config if config is not None else SamplingConfig()
        self.check_config(config, prompts=[p for p, _, _ in rows])
        return torch.cat([images for _, images in self._generate_rows(list(rows), config, None, None, None, progress)])

    def sampling_plan(self, config: SamplingConfig) -> list[dict[str, Any]]:
        """How each stage samples under `config`: [{"stage", "sampler", "steps", "unet_calls"}] per image. A
        progressively distilled stage takes its own sampler and steps; every step is one U-Net evaluation of the
        conditional and one of the unconditional input (batched together), except in a guidance-distilled stage.
        With compose, "unet_calls" counts a one-part prompt: a prompt of k parts costs steps x (k + 1)."""
        plan = []
        for stage in self.stages:
            c = stage.config
            own = c.sampling(config)
            plan.append({"stage": c.name, "sampler": own.sampler, "steps": own.steps,
                         "unet_calls": own.steps * (1 if c.guidance_distilled else 2)})
        return plan

    def check_config(self, config: SamplingConfig, stop_at: str | None = None, prompts: Sequence[str] = ()) -> None:
        """GenerationError when `config`'s stage_steps name a stage the run does not have, or when a stage that will
        run (all, or those up to `stop_at`) cannot sample with `config`: more steps than its timesteps or than the
        ones its sampler walks there, or a guidance-distilled stage asked for a guidance outside its range, a
        negative prompt or composed prompts. A progressively distilled stage is checked with the
        sampler and steps it samples with (`StageConfig.sampling`). With compose, `prompts` are checked too."""
        if config.compose:
            for prompt in prompts:
                prompt_parts(prompt)
        names = self.stage_names
        unknown = [name for name, _ in config.stage_steps if name not in names]
        if unknown:
            raise GenerationError(f"steps: {self.path} has no stage {unknown[0]!r} to give its own steps; "
                                  f"its stages are {', '.join(names)}")
        stages = self.stages[:names.index(stop_at) + 1] if stop_at in names else self.stages
        for stage in stages:
            c = stage.config
            own = c.sampling(config)  # a progressively distilled stage: its own sampler and steps
            if c.timesteps < own.steps:
                raise GenerationError(f"steps must be in [1, {c.timesteps}] for stage {c.name} ({c.timesteps} timesteps), "
                                      f"got {own.steps}")
            make_sampler(own.sampler, stage.schedule, own.eta).set_timesteps(own.steps)  # dpmpp3m, unipc: fewer on cosine
            c.check_guidance(config.guidance, negative=config.negative is not None)
            if config.compose and c.guidance_distilled:
                raise GenerationError(f"compose needs a conditional branch per part; stage {c.name} is guidance-distilled "
                                      "(one call per step): sample composed prompts with the run it was distilled from")

    def _generate_rows(self, rows, config, init_images, inpaint_mask, stop_at,
                       progress=None) -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, len(rows), config.batch_size):
            chunk = rows[start:start + config.batch_size]
            span = slice(start, start + len(chunk))
            init = _rows(init_images, span)
            mask = _rows(inpaint_mask, span)
            images = None
            for stage in self.stages:
                images = self._sample_stage(stage, [p for p, _, _ in chunk], [(s, k) for _, s, k in chunk], config,
                                            images, init, mask, progress)
                if stage.config.name == stop_at:
                    break
            yield start, images

    def _sample_stage(self, stage: TextToImageStage, prompts: list[str], samples: list[tuple[int, int]],
                      config: SamplingConfig, lowres, init_images, inpaint_mask, progress=None) -> torch.Tensor:
        """One stage: encode the prompts, guide the stage's denoiser, and sample at the stage's size; `samples`
        are each row's (seed, sample number)."""
        device = next(stage.parameters()).device
        # each stage draws from the seed anew; row (s, k) draws what sample k of a request seeded s draws
        generator = [g for s, k in samples for g in sample_generators(s, [k], device)]
        B, c = len(prompts), stage.config
        config = c.sampling(config)
        negative = config.negative
        texts, part_weights = list(prompts), None
        if config.compose:  # K parts per prompt, part-major; a prompt with fewer parts pads with weight-0 copies
            parts = [prompt_parts(p) for p in prompts]
            K = max(len(ps) for ps in parts)
            texts = [ps[k] if k < len(ps) else ps[0] for k in range(K) for ps in parts]
            part_weights = torch.tensor([[float(k < len(ps)) for ps in parts] for k in range(K)], device=device)
        n_cond = len(texts)
        texts += [negative] * B if negative is not None else []
        both = stage.encode_text(texts)  # one call, so prompt and negative share a padded length
        cond = {k: v[:n_cond] for k, v in both.items()}
        negative_cond = {k: v[n_cond:] for k, v in both.items()} if negative is not None else None
        denoiser = stage.guided_denoiser(cond, config.guidance, lowres, aug_level=config.aug_level, generator=generator,
                                         negative_cond=negative_cond, part_weights=part_weights)
        size = c.unet.image_size
        init = mask = None
        if init_images is not None:
            init = resize_images(init_images.to(device), size).expand(B, -1, -1, -1)
        if inpaint_mask is not None:
            mask = F.interpolate(inpaint_mask.float().to(device), size=(size, size), mode="nearest").expand(B, -1, -1, -1)
        callback = None
        if progress is not None:
            steps = config.steps if init is None else max(1, round(config.strength * config.steps))
            callback = lambda i, t, x, pred_x0: progress(c.name, i + 1, steps)  # noqa: E731
        return sample(denoiser, (B, c.unet.in_channels, size, size), schedule=stage.schedule, config=config,
                      objective=c.objective, cond=cond, generator=generator, init_x0=init, inpaint_mask=mask,
                      known_x0=init if mask is not None else None, device=device, callback=callback)


COMPOSE_SEPARATOR = "AND"  # with SamplingConfig.compose: "a red circle AND a blue square" is two parts
MAX_PROMPT_PARTS = 8  # each part is one more U-Net branch per step, batched with the others
_COMPOSE_SPLIT = re.compile(rf"(?<!\S){COMPOSE_SEPARATOR}(?!\S)")  # the word alone (spaces or the ends around it)


def prompt_parts(prompt: str) -> list[str]:
    """The parts of a composed prompt ("a red circle AND a blue square" -> two), or a GenerationError for an empty one."""
    parts = [part.strip() for part in _COMPOSE_SPLIT.split(prompt.strip())]
    if any(not part for part in parts):
        raise GenerationError(f"prompt {prompt!r} has an empty part: with compose, join non-empty parts by "
                              f"{COMPOSE_SEPARATOR!r}, e.g. 'a red circle AND a blue square'")
    if len(parts) > MAX_PROMPT_PARTS:
        raise GenerationError(f"prompt {prompt[:60]!r}... has {len(parts)} parts; compose takes at most {MAX_PROMPT_PARTS}")
    return parts


def _rows(images: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """A chunk's rows of per-sample images; one image (a batch of 1) is shared by every chunk."""
    return images if images is None or images.shape[0] == 1 else images[rows]


# ---------------------------------------------------------------------------------------------------
# Generating to files (what `imagen generate` does)


def read_prompts(prompt: str | None, prompts_file: str | Path | None) -> list[str]:
    """The prompts of a request: one prompt, or a file with one per line (blank lines skipped)."""
    if (prompt is None) == (prompts_file is None):
        raise GenerationError("give either a prompt or --prompts FILE (not both, not neither)")
    if prompts_file is not None:
        path, stdin = Path(prompts_file), str(prompts_file) == "-"
        # "-" is standard input; pipes such as bash's <(...) are read like files.
        if not stdin and not path.exists():
            raise GenerationError(f"prompt file {path} does not exist")
        if path.is_dir():
            raise GenerationError(f"prompt file {path} is a folder; give a text file with one prompt per line")
        try:
            lines = (sys.stdin.read() if stdin else path.read_text(encoding="utf-8")).splitlines()
        except UnicodeDecodeError:
            raise GenerationError(f"prompt file {path} is not UTF-8 text") from None
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise GenerationError(f"prompt file {path} holds no prompts (only blank lines)")
        return prompts
    if not prompt.strip():
        raise GenerationError("the prompt is empty; describe the picture, e.g. \"a red circle\"")
    return [prompt.strip()]


def _load_rgb(path, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """An image file as (1, 3, size, size) in [-1, 1], and its original (width, height)."""
    img = open_image(path)
    return normalize_images(image_to_tensor(img, size)[None]), img.size


def _indexed_files(out_dir: Path) -> set[str]:
    """The sample files an earlier `generate --out-dir` listed in this folder's index.jsonl (only those are ours)."""
    try:
        rows = [json.loads(line) for line in (out_dir / "index.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return set()
    return {Path(r["file"]).name for r in rows if isinstance(r, dict) and isinstance(r.get("file"), str)}


# A grid is built in memory (uint8) and written as one PNG; more samples than this go to --out-dir.
MAX_GRID_IMAGES = 1024


def _check_outputs(out, out_dir, total: int) -> None:
    """Fail before sampling, not after, when the outputs cannot be written."""
    if (out is None) == (out_dir is None):
        raise GenerationError("give exactly one of --out FILE.png (a grid) or --out-dir DIR (one PNG per sample)")
    if out is not None:
        out = Path(out)
        if out.is_dir():
            raise GenerationError(f"--out {out} is a folder; name a .png file in it, or use --out-dir {out}")
        if out.suffix.lower() != ".png":
            raise GenerationError(f"--out {out} must be a .png file")
        if total > MAX_GRID_IMAGES:
            raise GenerationError(f"a grid of {total} images is too large (at most {MAX_GRID_IMAGES}); "
                                  "use --out-dir DIR for one PNG per sample")
        where = out.parent
    else:
        where = Path(out_dir)
        if where.exists() and not where.is_dir():
            raise GenerationError(f"--out-dir {where} is a file; name a folder")
    parent = next((p for p in [where, *where.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise GenerationError(f"cannot write under {where}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK):
        raise GenerationError(f"cannot write under {where}: {parent} is not writable; choose another path")


def generate_to_files(run, prompts: Sequence[str], config: SamplingConfig | None = None, *, out=None, out_dir=None,
                      stage: str | None = None, init_image=None, mask=None, device: str = "auto") -> list[Path]:
    """Sample `config.n` images per prompt and write a grid (`out`) or one PNG per sample plus index.jsonl (`out_dir`).

    `init_image` (a file) starts image-to-image from it; with `mask` (a file of the same size, white where pixels
    are regenerated) it is inpainted. `stage` names the last stage to run. Samples are made `config.batch_size`
    at a time, and with `out_dir` each is written as soon as it is made.
    """
    config = config if config is not None else SamplingConfig()
    _check_outputs(out, out_dir, len(prompts) * config.n)
    if mask is not None and init_image is None:
        raise GenerationError("inpainting (--mask) needs the image to complete (--init-image)")
    pipe = TextToImagePipeline.from_run(run, device=device)
    size = pipe.image_size
    init = inpaint = None
    if init_image is not None:
        init, init_size = _load_rgb(init_image, size)
    if mask is not None:
        mask_rgb, mask_size = _load_rgb(mask, size)
        if mask_size != init_size:
            raise GenerationError(f"--mask {mask} is {mask_size[0]}x{mask_size[1]} but --init-image {init_image} is "
                                  f"{init_size[0]}x{init_size[1]}; give a mask of the image's size")
        inpaint = (mask_rgb.mean(1, keepdim=True) > 0).float()
    chunks = pipe.generate_chunks(prompts, config, init_images=init, inpaint_mask=inpaint, stop_at=stage)
    if out is not None:
        grid = torch.cat([to_uint8(images) for _, images in chunks])  # uint8: a quarter of float32
        return [save_grid(grid, Path(out), nrow=config.n)]
    out_dir = Path(out_dir)
    stale = _indexed_files(out_dir)
    written, rows = [], []
    for start, images in chunks:
        for i, image in enumerate(images, start=start):
            p, k = divmod(i, config.n)
            name = f"{p:04d}-{k:02d}.png"
            written.append(save_image(image, out_dir / name))
            rows.append({"prompt": prompts[p], "seed": config.seed, "sample": k, "file": name})
    for name in stale - {p.name for p in written}:  # an earlier request's samples, which index.jsonl would not list
        (out_dir / name).unlink(missing_ok=True)
    write_json_lines(out_dir / "index.jsonl", rows)
    return written
