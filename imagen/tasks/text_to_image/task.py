"""Text-to-image diffusion as a task: the denoising loss with text dropout, EMA updates and sample grids.

The trainer sees an ordinary task. Frozen text encoders are run once over the whole split before training
(`T2ISplit.precompute`), so each caption is encoded once; a trainable encoder runs inside the training step.
The loss's random draws (timestep, noise, caption dropout, low-res augmentation level) come from one generator
per sample, seeded by (run seed, epoch, sample index): a sample is noised the same way whichever process, batch
or resume it lands in, so training with N processes follows the one-process run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from imagen.data.image_files import resize_images, save_grid
from imagen.data.images import normalize_images
from imagen.diffusion import SamplingConfig, sample, training_loss
from imagen.tasks.text_to_image.grounding import grounding_loss, grounding_targets


class T2ISplit(torch.utils.data.Dataset):
    """uint8 images at the stage's size with their captions, or with precomputed frozen text encodings.

    `captions` holds one caption per image, or a list per image (several rows about one image, Shapes
    paraphrases): each visit of an image then draws one of its captions uniformly from the global torch RNG,
    which checkpoints carry, so a resumed run draws what an uninterrupted one would. With one caption per image
    no random number is drawn. Each distinct caption is stored, and encoded, once.
    """

    def __init__(self, images: torch.Tensor, captions: Sequence[str | Sequence[str]], seed: int = 0,
                 trim_text: bool = True):
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} caption lists")
        sets = [[c] if isinstance(c, str) else list(c) or [""] for c in captions]
        ids: dict[str, int] = {}
        flat = [ids.setdefault(c, len(ids)) for cs in sets for c in cs]
        self.images = images
        self.texts = list(ids)  # distinct captions; encodings are indexed like this list
        self.counts = torch.tensor([len(cs) for cs in sets], dtype=torch.long)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.caption_ids = torch.tensor(flat, dtype=torch.long)
        self.multi_caption = bool((self.counts > 1).any())
        self.encoded: dict[str, torch.Tensor] | None = None
        self.grounding: dict[str, torch.Tensor] | None = None  # see `ground`
        self.seed = seed
        self.epoch = 0
        # Batches drop the padding their captions share; off for a compiled U-Net, which wants one input shape.
        self.trim_text = trim_text

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next batches belong to: it keys each sample's noise (the trainer's loader sets it)."""
        self.epoch = epoch

    def sample_seeds(self, idx: torch.Tensor) -> torch.Tensor:
        """One 63-bit seed per sample of this epoch: a mix of (seed, epoch, index) (splitmix64's constants)."""
        offset = (self.epoch * 0x632BE59BD9B4E019 + self.seed * 0x3C6EF372FE94F82B) % 2**64
        offset -= 2**64 if offset >= 2**63 else 0  # as a signed 64-bit integer; the products below wrap around
        x = (idx.long() + 1) * -7046029254386353131 + offset
        x = (x ^ (x >> 31)) * -4658895280553007687
        return (x ^ (x >> 29)) & (2**63 - 1)

    @torch.no_grad()
    def precompute(self, stage, batch_size: int = 256) -> None:
        """Encode every distinct caption once with the stage's frozen text encoder; batches then carry the encodings."""
        # Chunks of similar length (by characters) waste little compute on padding; rows return to caption order.
        order = sorted(range(len(self.texts)), key=lambda i: len(self.texts[i]))
        chunks = [stage.encode_text([self.texts[i] for i in order[k:k + batch_size]])
                  for k in range(0, len(order), batch_size)]
        length = max(c["text_states"].shape[1] for c in chunks)

        def pad(x, value):
            return torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[1]) if x.dim() == 3 else (0, length - x.shape[1]), value=value)

        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        self.encoded = {
            "text_states": torch.cat([pad(c["text_states"].float().cpu(), 0.0) for c in chunks])[inverse],
            "text_mask": torch.cat([pad(c["text_mask"].cpu(), False) for c in chunks])[inverse],
            "text_embed": torch.cat([c["text_embed"].float().cpu() for c in chunks])[inverse],
        }

    def ground(self, phrases, encoder) -> None:
        """Grounding targets for every (image, caption) pair (after `precompute`): `phrases` per image as
        `grounding.image_phrases` gives them, located in each caption through `encoder`'s token offsets. Batches
        then carry ground_tokens, ground_masks and ground_valid."""
        if self.encoded is None:
            raise ValueError("ground() needs the captions encoded first (precompute)")
        caption_images = torch.repeat_interleave(torch.arange(len(self.counts)), self.counts)
        tokens, valid, masks = grounding_targets(phrases, self.texts, caption_images, self.caption_ids,
                                                 encoder.token_offsets(self.texts), self.encoded["text_mask"].shape[1],
                                                 self.images.shape[-1])
        self.grounding = {"tokens": tokens, "valid": valid, "masks": masks}

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.__getitems__([i])

    def draw_captions(self, idx: torch.Tensor) -> torch.Tensor:
        """The (image, caption) entries for images `idx`: a uniform draw among each image's captions (the caption
        ids into `texts` are `caption_ids[entries]`)."""
        pick = self.offsets[idx]
        if self.multi_caption:
            pick = pick + (torch.rand(len(idx)) * self.counts[idx]).long().clamp_max(self.counts[idx] - 1)
        return pick

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = {"images": self.images[idx], "sample_seeds": self.sample_seeds(idx)}
        entries = self.draw_captions(idx)
        cap = self.caption_ids[entries]
        if self.encoded is not None:
            mask = self.encoded["text_mask"][cap]
            length = max(1, int(mask.sum(1).max())) if self.trim_text else mask.shape[1]  # padding the batch shares
            # Contiguous slices: a compiled U-Net (--compile) checks its inputs' strides.
            batch.update(text_states=self.encoded["text_states"][cap, :length].contiguous(),
                         text_mask=mask[:, :length].contiguous(), text_embed=self.encoded["text_embed"][cap])
            if self.grounding is not None:
                g = self.grounding
                batch.update(ground_tokens=g["tokens"][entries, :, :length].contiguous(), ground_valid=g["valid"][entries],
                             ground_masks=g["masks"][idx])
        else:
            batch["texts"] = [self.texts[c] for c in cap.tolist()]
        return batch


class _SampleDraws:
    """Random draws of a batch, each sample's from its own CPU generator (moved to the batch's device by the caller)."""

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def integers(self, high: int) -> torch.Tensor:
        return torch.cat([torch.randint(0, high, (1,), generator=g) for g in self.generators])

    def uniform(self) -> torch.Tensor:
        return torch.cat([torch.rand(1, generator=g) for g in self.generators])

    def normal(self, shape) -> torch.Tensor:
        return torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators])


class TextToImageTask:
    """Trains one cascade stage (base or super-resolution) with the diffusion loss."""

    name = "text-to-image"
    monitor = ("loss", "min")
    # Every step uses every trainable parameter: a dropped caption is masked and zeroed, its path stays in the graph
    # (so DistributedDataParallel need not look for idle parameters, an extra graph traversal per step).
    find_unused_parameters = False

    def __init__(self, run_config=None, *, sample_every: int | None = None, sample_prompts=(), run_dir=None,
                 sample_steps: int = 20, lowres_source=None):
        self.sample_every = sample_every
        self.sample_prompts = list(sample_prompts)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.sample_steps = sample_steps
        self.lowres_source = lowres_source  # SR grids: callable(prompts) -> low-res images of the stage below
        self.grid_sampling: dict = {}  # SamplingConfig fields of the sample grids other than the defaults

    def collate(self, batch):
        return batch

    def compile_targets(self, model) -> list[torch.nn.Module]:
        """What `--compile` compiles: the U-Net that trains (the loss calls it directly, not the stage's forward)."""
        return [model.unet]

    def _condition(self, model, batch):
        if "text_states" in batch:
            return {k: batch[k] for k in ("text_states", "text_mask", "text_embed")}
        return model.encode_text(batch["texts"])

    def _draw(self, model, batch) -> dict:
        """A batch's clean images and random draws: x0, t, caption-drop mask, noise, the SR stage's low-res input
        (`extra`), and the per-sample generators (`draws`) for any further draw."""
        c = model.config
        x0 = normalize_images(batch["images"])
        B = x0.shape[0]
        seeds = batch.get("sample_seeds")
        if seeds is None:  # a batch not drawn from a T2ISplit
            seeds = torch.randint(0, 2**62, (B,))
        draws = _SampleDraws(seeds.tolist())
        cond = self._condition(model, batch)
        t = draws.integers(c.timesteps).to(x0.device)
        drop = draws.uniform().to(x0.device) < c.cond_drop_prob
        noise = draws.normal(x0.shape[1:]).to(x0)
        extra = {}
        if c.is_sr:
            lowres = resize_images(x0, c.lowres_size)
            level = draws.uniform().to(x0.device) * c.aug_level_max
            lowres_noise = draws.normal(lowres.shape[1:]).to(lowres)
            extra = {"lowres_image": model.lowres_input(lowres, level, noise=lowres_noise), "lowres_noise_level": level}
        return {"x0": x0, "t": t, "drop": drop, "noise": noise, "extra": extra, "draws": draws, "cond": cond}

    def _loss(self, model, batch, record: dict | None = None):
        """The denoising loss; with `record` (a dict), the forward pass's cross-attention probabilities go to
        record["maps"] (see `EfficientUNet.recording_cross_attention`) and the caption-drop mask to record["drop"]."""
        c = model.config
        d = self._draw(model, batch)
        cond = model.drop_condition(d["cond"], d["drop"])

        def denoiser(x_t, t, **kw):
            if record is None:
                return model.unet(x_t, t, **kw, **d["extra"]).float()
            with model.unet.recording_cross_attention() as maps:
                out = model.unet(x_t, t, **kw, **d["extra"]).float()
            record.update(maps=maps, drop=d["drop"])
            return out

        return training_loss(denoiser, d["x0"], d["t"], cond, schedule=model.schedule, objective=c.objective,
                             min_snr_gamma=c.min_snr_gamma, snr_floor=c.snr_floor, noise=d["noise"])

    def training_step(self, model, batch):
        weight = getattr(model.config, "grounding_weight", 0.0)
        if not (weight > 0 and "ground_tokens" in batch):
            return {"loss": self._loss(model, batch)}
        record: dict = {}
        loss = self._loss(model, batch, record)
        valid = batch["ground_valid"] & ~record["drop"][:, None]  # a dropped caption has no words to ground
        ground = grounding_loss(record["maps"], batch["ground_tokens"], batch["ground_masks"], valid)
        return {"loss": loss + weight * ground, "denoise": loss.detach(), "grounding": ground.detach()}

    @torch.no_grad()
    def validation_step(self, model, batch):
        return {"loss": self._loss(model, batch).detach().float()}

    def compute_metrics(self, outputs):
        return {"loss": float(torch.stack([o["loss"] for o in outputs]).mean())}

    def on_optimizer_step(self, model, step: int) -> None:
        """After every update: move the EMA weights; every `sample_every` steps, write a sample grid (returned to
        the trainer as the image summary "samples")."""
        model.update_ema(step)
        if self.sample_every and self.run_dir is not None and self.sample_prompts and step % self.sample_every == 0:
            with Image.open(self.write_grid(model, step)) as grid:
                return {"samples": np.asarray(grid.convert("RGB"))}
        return None

    def write_grid(self, model, step: int) -> Path:
        """Samples for the fixed validation prompts (own generator: the training RNG stream is untouched)."""
        config = SamplingConfig(steps=self.sample_steps, **self.grid_sampling)  # by default: the default sampler, guidance, thresholding
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(0)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                cond = model.encode_text(self.sample_prompts)
                lowres = self.lowres_source(self.sample_prompts) if model.config.is_sr and self.lowres_source else None
                denoiser = model.guided_denoiser(cond, config.guidance, lowres, aug_level=config.aug_level, generator=generator)
                B, c = len(self.sample_prompts), model.config
                images = sample(denoiser, (B, c.unet.in_channels, c.unet.image_size, c.unet.image_size), schedule=model.schedule,
                                config=config, objective=c.objective, cond=cond, generator=generator, device=device)
        finally:
            model.train(was_training)
        path = self.run_dir / "samples" / f"step-{step:06d}.png"
        return save_grid(images, path, nrow=len(self.sample_prompts))
