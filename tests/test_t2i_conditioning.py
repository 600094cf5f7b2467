"""A cascade stage's conditioning: caption dropout's rate, super-resolution noise augmentation, and how the pipeline
wires classifier-free guidance (guidance 1 = the conditional prediction; a negative prompt replaces the empty one).

The stages' U-Nets are swapped for a small recording module, so every value here is exact and cheap.
"""

import math
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from imagen.data.image_files import resize_images
from imagen.data.images import normalize_images
from imagen.diffusion import SamplingConfig, sample, sample_generators
from imagen.models.text_encoders import TextEncoding
from imagen.models.text_to_image import StageConfig, TextToImageStage
from imagen.models.unet import UNET_PRESETS, UNetConfig
from imagen.pipelines.text_to_image import TextToImagePipeline
from imagen.tasks.text_to_image import TextToImageTask

TEXT_DIM, TOKENS = 16, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest.one_thread


class HashTextEncoder:
    """A frozen stand-in text encoder: each prompt's states are drawn from a seed made of its text."""

    frozen = True

    def encode(self, texts):
        states = torch.stack([torch.randn(TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
                              for t in texts])
        mask = torch.ones(len(texts), TOKENS, dtype=torch.bool)
        return TextEncoding(states, mask, states.mean(1))


class RecordingUNet(nn.Module):
    """Stands in for the U-Net: records every call and returns a smooth function of all its inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.device_anchor = nn.Parameter(torch.zeros(()))  # stages look up their device from a parameter

    def forward(self, x_t, t, text_states, text_mask, text_embed, lowres_image=None, lowres_noise_level=None):
        self.calls.append(dict(x_t=x_t, t=t, text_states=text_states, text_mask=text_mask, text_embed=text_embed,
                               lowres_image=lowres_image, lowres_noise_level=lowres_noise_level))
        text = (text_states * text_mask[..., None]).sum((1, 2)) + text_embed.sum(-1) + 0.5 * text_mask.sum(1)  # (B,)
        out = 0.5 * x_t + 0.1 * text[:, None, None, None] + 1e-4 * t[:, None, None, None]
        if lowres_image is not None:
            out = out + 0.2 * lowres_image + lowres_noise_level[:, None, None, None]
        return out


def _stage(sr=False, **kw):
    unet = UNetConfig(**dict(UNET_PRESETS["tiny"], image_size=8, text_dim=TEXT_DIM, lowres_cond=sr))
    stage = TextToImageStage(StageConfig(name="sr1" if sr else "base", unet=unet, lowres_size=4 if sr else None, **kw),
                             text_encoder=HashTextEncoder())
    stage.unet, stage.ema_unet = RecordingUNet(), RecordingUNet()
    return stage


def _batch(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(B, TOKENS, TEXT_DIM, generator=g)
    return {"images": torch.randint(0, 256, (B, 3, 8, 8), generator=g, dtype=torch.uint8), "text_states": states,
            "text_mask": torch.ones(B, TOKENS, dtype=torch.bool), "text_embed": states.mean(1)}


# --- caption dropout ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_caption_dropout_drops_the_configured_share_and_gives_the_null_condition(rate):
    stage, B = _stage(cond_drop_prob=rate), 20_000
    batch = _batch(B)
    torch.manual_seed(0)
    TextToImageTask()._loss(stage, batch)
    (call,) = stage.unet.calls
    dropped = ~call["text_mask"].any(1)  # (B,) the null condition has no visible token
    assert dropped.float().mean().item() == pytest.approx(rate, abs=0.01)  # standard error <= 0.0033
    assert (call["text_embed"][dropped] == 0).all()
    assert torch.equal(call["text_embed"][~dropped], batch["text_embed"][~dropped])
    assert call["text_mask"][~dropped].all()


def test_no_caption_dropout_at_rate_zero():
    stage = _stage(cond_drop_prob=0.0)
    TextToImageTask()._loss(stage, _batch(2000))
    assert stage.unet.calls[0]["text_mask"].all()


# --- super-resolution noise augmentation (Imagen sec. 2.5) -------------------------------------------------------


def _cosine_abar(t, T=1000, s=0.008):
    """alphas_cumprod[t] of the cosine schedule (Nichol & Dhariwal 2021, eq. 17): f(t + 1) / f(0)."""
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t + 1) / f(0)


def test_augment_lowres_diffuses_to_the_level_exactly():
    stage = _stage(sr=True)
    lowres = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    level = torch.tensor([0.0, 0.1, 0.7])  # timesteps round(level * 999) = 0, 100, 699
    out = stage.augment_lowres(lowres, level, generator=torch.Generator().manual_seed(2))
    z = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    for i, t in enumerate([0, 100, 699]):
        a = _cosine_abar(t)
        torch.testing.assert_close(out[i], math.sqrt(a) * lowres[i] + math.sqrt(1 - a) * z[i], rtol=1e-5, atol=1e-5)
    # The stage's extra input is that image brought to the stage's size.
    up = stage.lowres_input(lowres, level, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(up, resize_images(out, 8))


def test_sr_training_augments_the_downsampled_image_at_uniform_levels(monkeypatch):
    stage, B = _stage(sr=True, aug_level_max=0.4), 20_000
    batch = _batch(B)
    seen = {}
    original = stage.lowres_input

    def record(lowres, level, generator=None, noise=None):
        seen["lowres"], seen["level"] = lowres, level
        return original(lowres, level, generator, noise)

    monkeypatch.setattr(stage, "lowres_input", record)
    torch.manual_seed(0)
    TextToImageTask()._loss(stage, batch)
    (call,) = stage.unet.calls
    # The low-res input is the training image at the stage below's size, noise-augmented at the level the U-Net is told.
    torch.testing.assert_close(seen["lowres"], resize_images(normalize_images(batch["images"]), 4))
    level = call["lowres_noise_level"]
    assert level is seen["level"]
    # Levels ~ U[0, aug_level_max]: mean 0.2 and std 0.4 / sqrt(12) = 0.1155, standard errors about 0.0008.
    assert 0.0 <= level.min() and level.max() <= 0.4
    assert level.mean().item() == pytest.approx(0.2, abs=0.004)
    assert level.std().item() == pytest.approx(0.4 / math.sqrt(12), abs=0.004)
    # The noise really is there and grows with the level: the residual of the upsampled clean image.
    resid = (call["lowres_image"] - resize_images(seen["lowres"], 8)).flatten(1).pow(2).mean(1)
    low, high = resid[level < 0.05].mean().item(), resid[level > 0.35].mean().item()
    assert low < 0.05 < 0.2 < high


def test_sr_denoiser_augments_once_at_the_sampling_level():
    stage = _stage(sr=True)
    lowres = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    den = stage.denoiser(lowres, aug_level=0.3, generator=torch.Generator().manual_seed(5))
    expected = stage.lowres_input(lowres, torch.full((2,), 0.3), generator=torch.Generator().manual_seed(5))
    x = torch.zeros(4, 3, 8, 8)  # a guided call stacks the batch twice: the low-res input is repeated
    cond = {k: v for k, v in _batch(4).items() if k != "images"}
    den(x, torch.tensor([10, 10, 10, 10]), **cond)
    (call,) = stage.ema_unet.calls
    torch.testing.assert_close(call["lowres_image"], expected.repeat(2, 1, 1, 1))
    assert call["lowres_noise_level"].tolist() == pytest.approx([0.3] * 4)


# --- guidance wiring in the pipeline ------------------------------------------------------------------------------


def _pipeline():
    torch.manual_seed(0)
    return TextToImagePipeline(path=Path("unused"), stages=[_stage()], config={})


def _reference(stage, prompts, config, uncond_texts=None):
    """Sample with the guided prediction written out by hand: uncond + g (cond - uncond) (Ho & Salimans 2022, eq. 6).

    The unconditional half is the null condition training's caption dropout produces, or the negative prompt.
    """
    enc = HashTextEncoder()
    c = enc.encode(prompts)
    cond = {"text_states": c.states, "text_mask": c.mask, "text_embed": c.pooled}
    if uncond_texts is None:
        uncond = TextToImageStage.drop_condition(cond, torch.ones(len(prompts), dtype=torch.bool))
    else:
        u = enc.encode(uncond_texts)
        uncond = {"text_states": u.states, "text_mask": u.mask, "text_embed": u.pooled}
    net, g = RecordingUNet(), config.guidance

    def guided(x_t, t):
        out_c, out_u = net(x_t, t, **cond), net(x_t, t, **uncond)
        return out_u + g * (out_c - out_u)

    generator = sample_generators(config.seed, [0] * len(prompts))  # the pipeline's: sample 0 of each prompt
    return sample(guided, (len(prompts), 3, 8, 8), schedule=stage.schedule, config=config, objective=stage.config.objective,
                  generator=generator)


def test_guidance_1_is_the_conditional_prediction():
    pipe, prompts = _pipeline(), ["a red circle", "a blue square"]
    config = SamplingConfig(steps=3, guidance=1.0, seed=4)
    out = pipe.generate(prompts, config)
    calls = pipe.stages[0].ema_unet.calls
    assert len(calls) == 3 and all(c["x_t"].shape[0] == 2 for c in calls)  # no unconditional half at all
    torch.testing.assert_close(out, _reference(pipe.stages[0], prompts, config, uncond_texts=["unused", "unused"]))
    # A negative prompt has nothing to replace without guidance.
    torch.testing.assert_close(pipe.generate(prompts, SamplingConfig(steps=3, guidance=1.0, seed=4, negative="a green triangle")), out)


def test_guidance_uses_the_null_condition_of_caption_dropout():
    pipe, prompts = _pipeline(), ["a red circle", "a blue square"]
    config = SamplingConfig(steps=3, guidance=3.0, seed=4)
    out = pipe.generate(prompts, config)
    assert all(c["x_t"].shape[0] == 4 for c in pipe.stages[0].ema_unet.calls)  # both halves in one call
    torch.testing.assert_close(out, _reference(pipe.stages[0], prompts, config))
    assert not torch.allclose(out, pipe.generate(prompts, SamplingConfig(steps=3, guidance=1.0, seed=4)))


def test_a_negative_prompt_replaces_the_empty_one_and_changes_the_result():
    pipe, prompts = _pipeline(), ["a red circle", "a blue square"]
    config = SamplingConfig(steps=3, guidance=3.0, seed=4, negative="a green triangle")
    out = pipe.generate(prompts, config)
    torch.testing.assert_close(out, _reference(pipe.stages[0], prompts, config, uncond_texts=["a green triangle"] * 2))
    plain = pipe.generate(prompts, SamplingConfig(steps=3, guidance=3.0, seed=4))
    assert (out - plain).abs().max() > 0.01


def test_the_pipeline_feeds_the_base_output_to_the_sr_stage_at_the_sampling_aug_level():
    torch.manual_seed(0)
    base, sr = _stage(), _stage(sr=True)
    pipe = TextToImagePipeline(path=Path("unused"), stages=[base, sr], config={})
    config = SamplingConfig(steps=2, guidance=1.0, seed=3, aug_level=0.25)
    low = pipe.generate(["a red circle"], config, stop_at="base")
    pipe.generate(["a red circle"], config)
    # Each stage draws from the seed anew, and the SR denoiser augments before the sampler draws.
    expected = sr.lowres_input(low, torch.full((1,), 0.25), generator=torch.Generator().manual_seed(3))
    for call in sr.ema_unet.calls:
        assert call["lowres_noise_level"].tolist() == [0.25]
        torch.testing.assert_close(call["lowres_image"], expected)
