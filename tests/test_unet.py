"""Efficient U-Net: shapes, text masking, conditioning, gradients, Efficient-U-Net ordering, overfitting, presets."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from imagen.config import ConfigError
from imagen.models.unet import Downsample, EfficientUNet, UNetConfig, Upsample, timestep_embedding

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: on a busy machine OpenMP threads spin-wait on each other (~100x slower), so use one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Oddly sized on purpose (text width 20, 7 tokens, batch 3) so a transposed dimension fails loudly.
TEXT_DIM, T, B = 20, 7, 3


def _config(**overrides):
    base = dict(image_size=16, dim=16, dim_mults=(1, 2), num_res_blocks=(1, 2), attn_levels=(False, True), num_heads=2, text_dim=TEXT_DIM)
    return UNetConfig(**{**base, **overrides})


def _model(seed=0, **overrides):
    """A tiny U-Net with every weight jittered, so zero-initialised convs neither hide inputs nor block gradients."""
    torch.manual_seed(seed)
    model = EfficientUNet(_config(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _inputs(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = config.image_size
    x_t = torch.randn(B, config.in_channels, size, size, generator=g)
    t = torch.tensor([0, 417, 999])
    text_states = torch.randn(B, T, config.text_dim, generator=g)
    text_mask = torch.ones(B, T, dtype=torch.bool)
    text_mask[1, 3:] = False
    text_mask[2, :] = False  # a fully dropped caption (classifier-free guidance)
    kwargs = dict(text_states=text_states, text_mask=text_mask)
    if config.lowres_cond:
        kwargs.update(lowres_image=torch.randn(B, config.in_channels, size, size, generator=g), lowres_noise_level=torch.rand(B, generator=g))
    return x_t, t, kwargs


@pytest.mark.parametrize("overrides", [dict(image_size=16), dict(image_size=24), dict(image_size=24, lowres_cond=True), dict(out_channels=6)])
def test_output_shape(overrides):
    model = _model(**overrides)
    x_t, t, kwargs = _inputs(model.config)
    out = model(x_t, t, **kwargs)
    assert out.shape == (B, model.config.out_channels, *x_t.shape[2:])
    assert torch.isfinite(out).all()
    # Unconditional: no text at all, cross-attention skipped.
    uncond = {k: v for k, v in kwargs.items() if not k.startswith("text")}
    assert model(x_t, t, **uncond).shape == out.shape


def test_text_padding_never_changes_the_output():
    model = _model()
    x_t, t, kwargs = _inputs(model.config)
    out = model(x_t, t, **kwargs)
    changed = kwargs["text_states"].clone()
    changed[~kwargs["text_mask"]] = 100.0 * torch.randn_like(changed[~kwargs["text_mask"]])
    torch.testing.assert_close(model(x_t, t, **{**kwargs, "text_states": changed}), out)


def test_conditioning_changes_the_output():
    model = _model()
    x_t, t, kwargs = _inputs(model.config)
    out = model(x_t, t, **kwargs)
    other_text = model(x_t, t, **{**kwargs, "text_states": torch.randn_like(kwargs["text_states"])})
    other_t = model(x_t, t.flip(0), **kwargs)
    # Rows 0 and 1 have real tokens, so new token states must move them.
    assert (out[:2] - other_text[:2]).abs().amax() > 1e-3
    assert (out[[0, 2]] - other_t[[0, 2]]).abs().amax() > 1e-3
    # The pooled text embedding alone (no token states) also conditions the model.
    embed = model(x_t, t, text_embed=torch.randn(B, TEXT_DIM))
    assert (embed - model(x_t, t, text_embed=torch.randn(B, TEXT_DIM))).abs().amax() > 1e-3


def test_lowres_conditioning_changes_the_output():
    model = _model(lowres_cond=True)
    x_t, t, kwargs = _inputs(model.config)
    out = model(x_t, t, **kwargs)
    assert (out - model(x_t, t, **{**kwargs, "lowres_noise_level": 1 - kwargs["lowres_noise_level"]})).abs().amax() > 1e-3
    assert (out - model(x_t, t, **{**kwargs, "lowres_image": torch.zeros_like(x_t)})).abs().amax() > 1e-3
    with pytest.raises(ValueError, match="lowres_image"):
        model(x_t, t, text_states=kwargs["text_states"])


@pytest.mark.parametrize("overrides", [dict(lowres_cond=False), dict(lowres_cond=True), dict(cross_attn_levels=(True, False)),
                                       dict(text_pool_queries=3)])
def test_every_parameter_gets_a_gradient(overrides):
    model = _model(**overrides).train()
    x_t, t, kwargs = _inputs(model.config)
    model(x_t, t, **kwargs).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_attention_pool_starts_silent_then_reads_what_a_mean_cannot():
    torch.manual_seed(0)
    plain = EfficientUNet(_config()).eval()
    pooled = EfficientUNet(_config(text_pool_queries=2)).eval()
    assert plain.text_pool is None and pooled.num_parameters() > plain.num_parameters()
    missing = pooled.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("text_pool.") for k in missing)
    x_t, t, kwargs = _inputs(pooled.config)
    # Zero-initialised projection: the pool joins a trained U-Net without changing its predictions.
    torch.testing.assert_close(pooled(x_t, t, **kwargs), plain(x_t, t, **kwargs))
    with torch.no_grad():
        pooled.text_pool.out[-1].weight.normal_(0, 0.5)
    # Two captions with the same mean token state: the mean pool gives both one conditioning vector, the
    # attention pool two (the U-Net builds the context with its null token first, as here).
    a, b = torch.randn(1, 1, TEXT_DIM), torch.randn(1, 1, TEXT_DIM)
    two = torch.cat([a, b], 1).expand(B, -1, -1)
    same_mean = torch.cat([(a + b) / 2, (a + b) / 2], 1).expand(B, -1, -1)
    mask = torch.ones(B, 2, dtype=torch.bool)

    def cond(model, states):
        context = torch.cat([model.null_text.expand(B, -1, -1), states], 1)
        return model.conditioning(t, states, mask, None, None, context=context, context_mask=torch.ones(B, 3, dtype=torch.bool))

    torch.testing.assert_close(cond(plain, two), cond(plain, same_mean))
    assert (cond(pooled, two) - cond(pooled, same_mean)).abs().amax() > 1e-3


def test_cross_attention_only_levels_attend_to_text_without_self_attention():
    model = _model(cross_attn_levels=(True, False))
    top = model.downs[0].attn
    assert top is not None and top.self_attn is None and top.cross_attn is not None
    assert model.downs[1].attn.self_attn is not None  # attn_levels still gives the full block
    assert _model().downs[0].attn is None
    x_t, t, kwargs = _inputs(model.config)
    out = model(x_t, t, **kwargs)
    # The text reaches the 16x16 level through the new blocks: zeroing their output projections changes rows with text.
    with torch.no_grad():
        for level in (model.downs[0], model.ups[-1]):
            level.attn.cross_attn.proj.weight.zero_()
            level.attn.cross_attn.proj.bias.zero_()
    assert (model(x_t, t, **kwargs)[:2] - out[:2]).abs().amax() > 1e-4


def test_downsample_before_convolutions_and_upsample_after():
    model = EfficientUNet(_config(dim_mults=(1, 2, 2), num_res_blocks=(1, 1, 2), attn_levels=(False, False, True)))
    assert not isinstance(next(model.downs[0].children()), Downsample)
    for level in model.downs[1:]:
        assert isinstance(next(level.children()), Downsample)
    # ups run deep -> shallow; every level but the shallowest ends with an Upsample.
    for level in model.ups[:-1]:
        assert isinstance(list(level.children())[-1], Upsample)
    assert not isinstance(list(model.ups[-1].children())[-1], Upsample)


def test_res_blocks_start_as_scaled_identity():
    torch.manual_seed(0)
    block = EfficientUNet(_config()).mid_block1
    x = torch.randn(2, 32, 8, 8)
    torch.testing.assert_close(block(x, torch.randn(2, block.film.in_features)), x * 2**-0.5)


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0.0, 1.0]), 6)
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)])
    torch.testing.assert_close(emb[1], torch.cat([freqs.cos(), freqs.sin()]))


def test_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = EfficientUNet(_config(num_res_blocks=(1, 1))).train()
    x_t, t, kwargs = _inputs(model.config)
    target = torch.rand(B, 3, 16, 16) * 2 - 1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = F.mse_loss(model(x_t, t, **kwargs), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_presets_and_parameter_count():
    model = EfficientUNet.from_preset("base32")
    n = model.num_parameters()
    print(f"base32 parameters: {n:,}")
    assert 3_000_000 <= n <= 4_500_000
    assert EfficientUNet.from_preset("sr64").config.lowres_cond
    assert EfficientUNet.from_preset("tiny", image_size=24).config.image_size == 24
    with pytest.raises(ConfigError, match="unknown U-Net preset"):
        EfficientUNet.from_preset("huge")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(image_size=18, dim_mults=(1, 2, 2), num_res_blocks=(1, 1, 1), attn_levels=(False,) * 3), "image size 18"),
        (dict(num_res_blocks=(1, 2, 2)), "num_res_blocks"),
        (dict(attn_levels=(True,)), "attn_levels"),
        (dict(cross_attn_levels=(True, False, False)), "cross_attn_levels"),
        (dict(dim=12), "groups"),
    ],
)
def test_config_errors_name_the_value(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(**overrides)


@pytest.mark.parametrize("overrides", [dict(), dict(cross_attn_levels=(True, False))])
def test_config_survives_a_json_round_trip(overrides):
    config = _config(**overrides)
    assert UNetConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config
