"""Text-to-image from the Python API and the CLI: train the cascade, load it, generate, write grids.

A text-to-image run directory holds the cascade:

    RUN/config.json        {"task": "text-to-image", "stages": [...], "text_encoder": spec, "data": ...}
    RUN/tokenizer.json     when the text encoder is trained with the U-Nets
    RUN/base/, RUN/sr1/    one trainer run directory per stage (config.json, model.safetensors, checkpoints/,
                           metrics.jsonl, samples/ grids written as training goes)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from imagen.errors import GenerationError
from imagen.config import CAPTION_MODES, DEFAULT_GUIDANCE, DEFAULT_T2I_CAPTIONS, DEFAULT_T2I_STEPS, ConfigError, TrainConfig, from_dict, to_dict
from imagen.data import DataError, Tokenizer, load_dataset
from imagen.data.images import normalize_images
from imagen.models.text_to_image import StageConfig, TextToImageStage, resize_images, stage_config_to_json
from imagen.models.unet import UNET_PRESETS, UNetConfig
from imagen.atomic import write_json as write_json_atomic
from imagen.runs import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, RunError

log = logging.getLogger("imagen")
TASK = "text-to-image"

# Stage recipes for the built-in worlds, sized for a CPU: a 16x16 base model and a 16 -> 32 super-resolution.
STAGE_PRESETS: dict[str, dict[str, Any]] = {
    "base16": dict(image_size=16, dim=48, dim_mults=(1, 2, 2), num_res_blocks=(1, 2, 2), attn_levels=(False, True, True), num_heads=4),
    "base32": UNET_PRESETS["base32"],
    "sr32": dict(image_size=32, dim=32, dim_mults=(1, 2, 2), num_res_blocks=(1, 1, 2), attn_levels=(False, False, True), num_heads=4, lowres_cond=True),
    "sr64": UNET_PRESETS["sr"],
}




# ---------------------------------------------------------------------------------------------------
# Grids and image files


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, C, H, W) -> uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, C, H, W) pictures at size x size (e.g. the Shapes evaluator's 32x32), uint8 again."""
    if images.shape[-1] == size:
        return images
    return to_uint8(resize_images(normalize_images(images), size))


def save_image(image: torch.Tensor, path: Path) -> Path:
    """Write one (C, H, W) image in [-1, 1] (or uint8) as PNG, atomically."""
    from PIL import Image

    arr = (image if image.dtype == torch.uint8 else to_uint8(image[None])[0]).permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    tmp.replace(path)
    return path


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, pad: int = 2) -> Path:
    """Tile (B, C, H, W) images (in [-1, 1] or uint8) into one PNG, `nrow` per row."""
    imgs = images if images.dtype == torch.uint8 else to_uint8(images)
    B, C, H, W = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    rows = math.ceil(B / nrow)
    grid = torch.zeros(C, rows * (H + pad) + pad, nrow * (W + pad) + pad, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = imgs[i]
    return save_image(grid, path)


# ---------------------------------------------------------------------------------------------------
# The cascade


@dataclass
class Cascade:
    """The loaded stages of a text-to-image run, lowest resolution first."""

    path: Path
    stages: list[TextToImageStage]
    config: dict[str, Any]

    @property
    def image_size(self) -> int:
        return self.stages[-1].config.unet.image_size

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, n_per_prompt: int = 1, seed: int = 0, steps: int = 25,
                 sampler: str = "dpmpp2m", guidance: float = DEFAULT_GUIDANCE, negative: str | None = None,
                 threshold: str = "dynamic", aug_level: float = 0.1, eta: float = 0.0, init_images=None,
                 strength: float = 1.0, inpaint_mask=None, stop_at: str | None = None) -> torch.Tensor:
        """Images (len(prompts) * n_per_prompt, 3, S, S) in [-1, 1], prompt-major; same seed, same images."""
        prompts = [p for p in prompts for _ in range(n_per_prompt)]
        images = None
        for stage in self.stages:
            device = next(stage.parameters()).device
            generator = torch.Generator(device=device).manual_seed(seed)
            texts = prompts + ([negative] * len(prompts) if negative is not None else [])
            both = stage.encode_text(texts)  # one call, so prompt and negative share a padded length
            cond = {k: v[:len(prompts)] for k, v in both.items()}
            neg = {k: v[len(prompts):] for k, v in both.items()} if negative is not None else None
            size = stage.config.unet.image_size
            init = resize_images(init_images.to(device), size) if init_images is not None else None
            mask = None
            if inpaint_mask is not None:
                mask = torch.nn.functional.interpolate(inpaint_mask.float().to(device), size=(size, size), mode="nearest")
            images = stage.generate(cond, steps=steps, sampler=sampler, guidance=guidance, negative=neg,
                                    threshold=threshold, eta=eta, generator=generator, lowres=images,
                                    aug_level=aug_level, init_images=init, strength=strength, inpaint_mask=mask)
            if stop_at is not None and stage.config.name == stop_at:
                break
        return images


def read_t2i_config(run: str | Path) -> dict[str, Any]:
    run = Path(run)
    path = run / CONFIG_NAME
    if not path.is_file():
        raise RunError(f"{run} is not a run directory (no {CONFIG_NAME}); pass the --out folder of `imagen train-t2i`")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path} is damaged ({e.msg}); train the run again") from None
    if config.get("task") != TASK:
        raise RunError(f"{run} is a {config.get('task', 'unknown')!r} run, not a text-to-image run; train one with `imagen train-t2i`")
    return config


def _text_encoder_for(run: Path, spec: dict[str, Any]):
    from imagen.models.text_encoders import build_text_encoder

    tokenizer = Tokenizer.load(run / TOKENIZER_NAME) if (run / TOKENIZER_NAME).is_file() else None
    return build_text_encoder(spec, tokenizer=tokenizer)


def load_stage(run: Path, name: str, text_encoder=None, map_location="cpu") -> TextToImageStage:
    """One finished stage of a cascade run."""
    from imagen.train.checkpoint import load_weights

    stage_dir = run / name
    if not (stage_dir / WEIGHTS_NAME).is_file():
        raise RunError(f"stage {name!r} of {run} is not trained (no {name}/{WEIGHTS_NAME}); train it with "
                       f"`imagen train-t2i --out {run} --stage {name}` (or --resume)")
    cfg = json.loads((stage_dir / CONFIG_NAME).read_text())
    stage_cfg = StageConfig(**cfg["stage"])
    top = read_t2i_config(run)
    encoder = text_encoder if text_encoder is not None else _text_encoder_for(run, top["text_encoder"])
    stage = TextToImageStage(stage_cfg, encoder)
    load_weights(stage_dir / WEIGHTS_NAME, stage)
    return stage.to(map_location).eval()


def load_cascade(run: str | Path, stages: Sequence[str] | None = None, map_location="cpu") -> Cascade:
    """Load a text-to-image run's trained stages (all of them, or the named ones, in cascade order)."""
    run = Path(run)
    config = read_t2i_config(run)
    names = list(stages) if stages else [s for s in config["stages"] if (run / s / WEIGHTS_NAME).is_file()]
    if not names:
        raise RunError(f"{run} has no trained stage yet; finish it with `imagen train-t2i --out {run} --resume`")
    unknown = [n for n in names if n not in config["stages"]]
    if unknown:
        raise RunError(f"{run} has no stage {unknown[0]!r}; its stages are {', '.join(config['stages'])}")
    if names[0] != config["stages"][0]:
        raise RunError(f"the cascade must start at its base stage {config['stages'][0]!r}")
    frozen = None
    loaded = []
    for name in names:
        stage = load_stage(run, name, text_encoder=frozen, map_location=map_location)
        if stage.text_encoder is None:
            frozen = stage.encoder  # frozen encoders are shared, loaded once
        loaded.append(stage)
    return Cascade(path=run, stages=loaded, config=config)


# ---------------------------------------------------------------------------------------------------
# Training the cascade


def default_stages(sizes: Sequence[int]) -> list[StageConfig]:
    """A base stage at sizes[0] and one super-resolution stage per further size (sr1, sr2, ...)."""
    stages = []
    for i, size in enumerate(sizes):
        if i == 0:
            preset = {16: "base16", 32: "base32"}.get(size, "base16")
            unet = dict(STAGE_PRESETS[preset], image_size=size)
            # The base stage decides the layout, at nearly pure noise: the SNR floor keeps those steps trained
            # (with Min-SNR alone, Shapes position words were ignored: 0.12 position accuracy, chance for 9 cells).
            stages.append(StageConfig(name="base", unet=UNetConfig(**unet), snr_floor=1.0))
        else:
            preset = {32: "sr32", 64: "sr64"}.get(size, "sr32")
            unet = dict(STAGE_PRESETS[preset], image_size=size, lowres_cond=True)
            stages.append(StageConfig(name=f"sr{i}", unet=UNetConfig(**unet), lowres_size=sizes[i - 1]))
    return stages


def _stage_train_config(kwargs: dict[str, Any]) -> TrainConfig:
    values = dict(lr=1e-3, weight_decay=0.0, batch_size=32, warmup_steps=100, grad_clip=1.0, log_every=25)
    values.update({k: v for k, v in kwargs.items() if v is not None})
    return TrainConfig(**values)


def _caption_sets(ds, mode: str) -> list[list[str]]:
    sets = ds.caption_sets()
    return [cs[:1] for cs in sets] if mode == "first" else sets


def _prepare_t2i_run(out: Path, resume: bool, stage: str | None) -> dict[str, Any] | None:
    """The existing cascade config when continuing a run (resume, or adding a stage), else None for a new run."""
    if (out / CONFIG_NAME).is_file():
        config = read_t2i_config(out)
        if resume or stage is not None:
            return config
        raise RunError(f"--out {out} already holds a text-to-image run; pass --resume to continue it or --stage NAME to train one stage")
    if resume:
        raise RunError(f"cannot resume: {out} is not a run directory (no {CONFIG_NAME}); start a new run without --resume")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"--out {out} already exists and is not empty; choose a new directory")
    return None


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
) -> dict[str, Any]:
    """Train the cascade (every stage, or just `stage`) into one run directory; returns per-stage results.

    captions: "all" draws one of each image's captions per visit (rows about one image, Shapes paraphrases);
    "first" keeps only each image's first caption.
    """
    from imagen.config import apply_overrides
    from imagen.models.text_encoders import text_encoder_from_arg
    from imagen.tasks.text_to_image import T2ISplit, TextToImageTask
    from imagen.train import Trainer, seed_everything

    out = Path(out)
    existing = _prepare_t2i_run(out, resume, stage)
    seed = train_kwargs.get("seed") or 0
    created = existing is None
    try:
        if existing is None:
            if captions not in CAPTION_MODES:
                raise ConfigError(f"--captions {captions!r}: choose one of {', '.join(CAPTION_MODES)}")
            if len(sizes) < 1 or any(s <= 0 or s % 4 for s in sizes) or list(sizes) != sorted(set(sizes)):
                raise ConfigError(f"--sizes {list(sizes)} must be increasing multiples of 4, e.g. 16,32")
            train_ds = load_dataset(data, "train", seed=seed, n=n, on_bad_sample=on_bad_sample)
            if not train_ds.has_text:
                raise DataError(f"data {data!r} has no captions; text-to-image needs image-text pairs")
            caption_sets = _caption_sets(train_ds, captions)
            tokenizer = None
            if text_encoder == "trainable":
                tokenizer = Tokenizer.train([t for cs in caption_sets for t in cs], vocab_size=1024)
            encoder = text_encoder_from_arg(text_encoder, tokenizer=tokenizer)
            stage_cfgs = default_stages(sizes)
            for cfg in stage_cfgs:
                cfg.unet = UNetConfig(**{**dataclasses.asdict(cfg.unet), "text_dim": encoder.dim, "cond_dim": encoder.dim})
                cfg.text_encoder = encoder.spec()
            sections = {cfg.name: cfg for cfg in stage_cfgs}
            apply_overrides(sections, list(sets))
            out.mkdir(parents=True, exist_ok=True)
            if tokenizer is not None:
                tokenizer.save(out / TOKENIZER_NAME)
            config = {"task": TASK, "stages": [c.name for c in stage_cfgs], "text_encoder": encoder.spec(),
                      "data": {"spec": str(data), "seed": seed, "n": n, "captions": captions}, "sizes": list(sizes),
                      "stage_configs": {c.name: stage_config_to_json(c) for c in stage_cfgs}}
            write_json_atomic(out / CONFIG_NAME, config)
        else:
            config = existing
            train_ds = load_dataset(config["data"]["spec"], "train", seed=config["data"]["seed"], n=config["data"].get("n"), on_bad_sample=on_bad_sample)
            encoder = _text_encoder_for(out, config["text_encoder"])
            # Runs made before the option trained on each image's first caption.
            caption_sets = _caption_sets(train_ds, config["data"].get("captions", "first"))
    except BaseException:
        if created and out.exists() and not any(out.iterdir()):
            out.rmdir()
        raise

    names = config["stages"] if stage is None else [stage]
    if stage is not None and stage not in config["stages"]:
        raise RunError(f"{out} has no stage {stage!r}; its stages are {', '.join(config['stages'])}")
    val_ds = load_dataset(config["data"]["spec"], "val", seed=config["data"]["seed"], n=config["data"].get("n"), on_bad_sample=on_bad_sample)
    val_ds = val_ds.subset(range(min(8, len(val_ds))))  # the fixed prompts of the sample grids, and their images
    prompts = val_ds.texts()
    results = {}
    for name in names:
        stage_dir = out / name
        if (stage_dir / WEIGHTS_NAME).is_file():
            if stage is None:
                log.info("stage %s is already trained; skipping it", name)
                continue
            raise RunError(f"stage {name!r} of {out} is already trained; train into a new --out to start over")
        stage_cfg = StageConfig(**config["stage_configs"][name])
        steps = sr_max_steps if (stage_cfg.is_sr and sr_max_steps) else max_steps
        if steps is None and train_kwargs.get("epochs") is None:
            steps = DEFAULT_T2I_STEPS["sr" if stage_cfg.is_sr else "base"]
        tcfg = _stage_train_config({**train_kwargs, "max_steps": steps})
        continuing = (stage_dir / CONFIG_NAME).is_file()
        stage_dir.mkdir(parents=True, exist_ok=True)
        if not continuing:
            write_json_atomic(stage_dir / CONFIG_NAME, {"task": "text-to-image-stage", "stage": stage_config_to_json(stage_cfg), "train": to_dict(tcfg)})
        else:
            tcfg = from_dict(TrainConfig, json.loads((stage_dir / CONFIG_NAME).read_text())["train"])
        seed_everything(tcfg.seed)
        if stage_cfg.text_encoder.get("kind") == "trainable":
            stage_encoder = _text_encoder_for(out, stage_cfg.text_encoder)  # each stage trains its own copy
        else:
            stage_encoder = encoder
        model = TextToImageStage(stage_cfg, stage_encoder)
        size = stage_cfg.unet.image_size
        split = T2ISplit(train_ds.fast_images(size), caption_sets)
        if model.text_encoder is None:
            split.precompute(model)
        val_images = val_ds.fast_images(size)

        def lowres_source(_prompts, images=val_images, cfg=stage_cfg):
            return resize_images(normalize_images(images), cfg.lowres_size)

        task = TextToImageTask(sample_every=sample_every or max(1, (tcfg.max_steps or 1000) // 4), sample_prompts=prompts,
                               run_dir=stage_dir, lowres_source=lowres_source)
        log.info("training stage %s (%dx%d, %.2fM parameters) in %s", name, size, size, model.unet.num_parameters() / 1e6, stage_dir)
        from imagen.train import latest_checkpoint

        can_resume = resume and latest_checkpoint(stage_dir) is not None
        result = Trainer(model, task, split, None, tcfg, stage_dir, collate_fn=task.collate).fit(resume=can_resume)
        results[name] = result
        if result.status == "interrupted":
            break
    return results


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


def _load_rgb(path, size) -> torch.Tensor:
    from imagen.data import image_to_tensor, open_image
    return normalize_images(image_to_tensor(open_image(path), size)[None])


def generate_to_files(run, prompts: Sequence[str], *, out=None, out_dir=None, n: int = 4, seed: int = 0,
                      steps: int = 25, sampler: str = "dpmpp2m", eta: float = 0.0, guidance: float = DEFAULT_GUIDANCE,
                      negative: str | None = None, threshold: str = "dynamic", aug_level: float = 0.1,
                      stage: str | None = None, init_image=None, strength: float = 0.6, mask=None,
                      device: str = "auto") -> list[Path]:
    """Sample `n` images per prompt and write a grid (`out`) or one PNG per sample plus index.jsonl (`out_dir`)."""
    from imagen.diffusion import SAMPLERS, THRESHOLDS
    from imagen.train import resolve_device

    if sampler not in SAMPLERS:
        raise GenerationError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if threshold not in THRESHOLDS:
        raise GenerationError(f"unknown threshold {threshold!r}; choose one of: {', '.join(THRESHOLDS)}")
    if steps <= 0:
        raise GenerationError(f"steps must be positive, got {steps}")
    if guidance < 0:
        raise GenerationError(f"guidance must be >= 0, got {guidance}")
    if not 0.0 <= aug_level <= 1.0:
        raise GenerationError(f"--aug-level must be in [0, 1], got {aug_level}")
    if (out is None) == (out_dir is None):
        raise GenerationError("give exactly one of --out FILE.png (a grid) or --out-dir DIR (one PNG per sample)")
    if out is not None and not str(out).lower().endswith(".png"):
        raise GenerationError(f"--out {out} must be a .png file")
    if mask is not None and init_image is None:
        raise GenerationError("inpainting (--mask) needs the image to complete (--init-image)")
    if not 0.0 < strength <= 1.0:
        raise GenerationError(f"--strength must be in (0, 1], got {strength}")
    cascade = load_cascade(run, map_location=resolve_device(device))
    if stage is not None and stage not in [s.config.name for s in cascade.stages]:
        raise RunError(f"{run} has no trained stage {stage!r}; trained: {', '.join(s.config.name for s in cascade.stages)}")
    size = cascade.image_size
    init = _load_rgb(init_image, size).expand(len(prompts) * n, -1, -1, -1) if init_image is not None else None
    inpaint = None
    if mask is not None:
        inpaint = (_load_rgb(mask, size).mean(1, keepdim=True) > 0).float().expand(len(prompts) * n, -1, -1, -1)
    images = cascade.generate(prompts, n_per_prompt=n, seed=seed, steps=steps, sampler=sampler, guidance=guidance,
                              negative=negative, threshold=threshold, aug_level=aug_level, eta=eta, init_images=init,
                              strength=strength if init is not None and inpaint is None else 1.0,
                              inpaint_mask=inpaint, stop_at=stage)
    if out is not None:
        return [save_grid(images, Path(out), nrow=n)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, rows = [], []
    for i, image in enumerate(images):
        p, k = divmod(i, n)
        name = f"{p:04d}-{k:02d}.png"
        written.append(save_image(image, out_dir / name))
        rows.append({"prompt": prompts[p], "seed": seed, "sample": k, "file": name})
    write_json_lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
    tmp = out_dir / ".index.jsonl.tmp"
    tmp.write_text(write_json_lines, encoding="utf-8")
    tmp.replace(out_dir / "index.jsonl")
    return written


# ---------------------------------------------------------------------------------------------------
# Evaluation (what `imagen evaluate-t2i` does)


def evaluate_t2i(run, data: str = "shapes", *, n_per_category: int = 50, steps: int = 25, sampler: str = "dpmpp2m",
                 guidance: float = DEFAULT_GUIDANCE, seed: int = 0, aug_level: float = 0.1, fid_samples: int = 500,
                 alignment_run=None, device: str = "auto", batch_size: int = 64, echo=print) -> dict[str, Any]:
    """Compositional accuracy on held-out Shapes prompts, FID against real test images, optional alignment."""
    from imagen.eval.evaluator import get_evaluator
    from imagen.eval.t2i import alignment_score, compositional_accuracy, compositional_prompts, fid
    from imagen.train import resolve_device

    dev = resolve_device(device)
    cascade = load_cascade(run, map_location=dev)
    size = cascade.image_size

    def generate_fn(prompts):
        return to_uint8(cascade.generate(prompts, seed=seed, steps=steps, sampler=sampler, guidance=guidance, aug_level=aug_level))

    result: dict[str, Any] = {"run": str(run), "data": str(data), "steps": steps, "sampler": sampler, "guidance": guidance, "image_size": size}
    # One evaluator serves both: it reads scenes back, and its features (a network trained only on real Shapes
    # renderings) stand in for Inception's in FID.
    evaluator = get_evaluator(32, device=str(dev))
    if str(data) == "shapes":
        prompts = compositional_prompts(n_per_category, seed=20_000 + seed, size=32)
        result.update(compositional_accuracy(lambda p: resize_uint8(generate_fn(p), 32), prompts, evaluator, batch_size=batch_size))
    test = load_dataset(data, "test", seed=cascade.config["data"].get("seed", 0))
    texts = [t or "" for t in test.texts()][:fid_samples]
    real = test.fast_images(size)[:len(texts)]
    fake = torch.cat([generate_fn(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])
    result["fid"] = fid(real, fake, evaluator)
    result["fid_samples"] = len(texts)
    if alignment_run is not None:
        from imagen.tasks.loading import load

        aligner = load(alignment_run)
        result["alignment"] = alignment_score(fake, texts, aligner)
    out_dir = Path(run) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / f"t2i-{Path(str(data)).name}.json", result)
    save_grid(fake[:32], out_dir / f"t2i-{Path(str(data)).name}-samples.png", nrow=8)
    for key, value in result.items():
        if isinstance(value, float):
            echo(f"{key:28s} {value:.4f}")
    return result
