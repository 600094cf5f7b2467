"""Encoder, pretraining heads and classification head: shapes, masks, gradients, freezing."""

import math
from types import SimpleNamespace

import pytest
import torch

from imagen.config import EncoderConfig, PretrainConfig
from imagen.errors import ConfigError
from imagen.models import EncoderForClassification, MultimodalEncoder, PretrainingModel, patchify
from imagen.models.encoder import resample_pos_embed
from imagen.models.pretraining import mask_tokens, random_patch_mask

# Oddly sized on purpose so a transposed dimension fails loudly.
CFG = EncoderConfig(image_size=12, patch_size=3, vocab_size=37, max_text_len=9, dim=24, num_layers=2, num_heads=3, mlp_ratio=2.0)


def _text(B=5, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, CFG.vocab_size, (B, T), generator=g)
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    ids[~mask] = 0
    return ids, mask


def test_encoder_shapes_for_every_modality():
    torch.manual_seed(0)
    enc = MultimodalEncoder(CFG).eval()
    images = torch.randn(5, 3, 12, 12)
    ids, mask = _text()
    img = enc(images=images)
    assert img.image_states.shape == (5, 1 + 16, 24) and img.text_states is None
    txt = enc(input_ids=ids, attention_mask=mask)
    assert txt.text_states.shape == (5, 7, 24) and txt.image_states is None
    joint = enc(images=images, input_ids=ids, attention_mask=mask)
    assert joint.image_states.shape == (5, 17, 24) and joint.text_states.shape == (5, 7, 24)
    assert joint.image_embed.shape == joint.text_embed.shape == (5, 24)
    # Fusion: the joint image embedding sees the text, so it differs from the image-only one.
    assert not torch.allclose(joint.image_embed, img.image_embed)


@pytest.mark.parametrize("patch_size, stem_layers, grid", [(4, 1, 4), (4, 3, 4), (8, 3, 2), (8, 4, 2), (2, 0, 8)])
def test_conv_stem_reaches_the_patch_grid(patch_size, stem_layers, grid):
    cfg = EncoderConfig(image_size=16, patch_size=patch_size, stem_channels=4, stem_layers=stem_layers, vocab_size=37,
                        max_text_len=9, dim=24, num_layers=1, num_heads=3)
    enc = MultimodalEncoder(cfg)
    assert enc(images=torch.randn(2, 3, 16, 16)).image_states.shape == (2, 1 + grid * grid, 24)
    convs = [m for m in enc.patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == stem_layers + 1  # the stem's 3x3 convs, then the projection


def test_batch_norm_stem_normalises_each_conv():
    cfg = EncoderConfig(image_size=16, patch_size=4, stem_channels=4, stem_layers=3, stem_norm="batch", vocab_size=37,
                        max_text_len=9, dim=24, num_layers=1, num_heads=3)
    enc = MultimodalEncoder(cfg)
    norms = [m for m in enc.patch_embed.stem.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    convs = [m for m in enc.patch_embed.stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(norms) == len(convs) == 3 and all(c.bias is None for c in convs)
    enc(images=torch.randn(4, 3, 16, 16) * 5 + 3)  # training mode: batch statistics; the running ones move
    assert norms[0].running_mean.abs().sum() > 0 and norms[0].num_batches_tracked == 1
    with pytest.raises(ConfigError, match="stem_norm"):
        EncoderConfig(stem_norm="layer")


def test_masked_image_modelling_hides_masked_pixels_from_the_stem():
    # A 3-layer stem sees past each 4 px patch; the masked patches' pixels must not reach the encoder.
    cfg = EncoderConfig(image_size=16, patch_size=4, stem_channels=4, stem_layers=3, vocab_size=37, max_text_len=9,
                        dim=24, num_layers=1, num_heads=3)
    model = PretrainingModel(cfg, PretrainConfig(image_only=True, mim_mask_ratio=0.5, mim_blank_pixels=True)).eval()
    seen = []
    model.encoder.register_forward_hook(lambda m, args, kwargs, out: seen.append(out.image_states), with_kwargs=True)
    images = torch.randn(2, 3, 16, 16)
    torch.manual_seed(0)
    model.mim_loss(images)
    torch.manual_seed(0)
    mask = random_patch_mask(2, 16, 0.5, images.device)  # the same draw as inside mim_loss
    changed = images.clone()
    pixels = mask.view(2, 1, 4, 1, 4, 1).expand(-1, 3, -1, 4, -1, 4).reshape(2, 3, 16, 16)
    changed[pixels] = torch.randn(int(pixels.sum()))
    torch.manual_seed(0)
    model.mim_loss(changed)
    torch.testing.assert_close(seen[0], seen[1])  # every token, masked or not, is blind to the masked pixels
    model.pretrain.mim_blank_pixels = False  # the default: the stem's view of the masked pixels reaches the tokens
    torch.manual_seed(0)
    model.mim_loss(changed)
    assert not torch.allclose(seen[0], seen[2])


def test_position_embeddings_resample_to_a_new_grid():
    grid = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)
    pos = torch.cat([torch.full((1, 1, 2), -7.0), torch.stack([grid, -grid], -1).reshape(1, 16, 2)], dim=1)  # (1, 17, 2)
    up = resample_pos_embed(pos, 8)
    assert up.shape == (1, 65, 2) and up[0, 0].tolist() == [-7.0, -7.0]  # [CLS] row kept
    rows = up[0, 1:, 0].reshape(8, 8)
    # Bicubic upsampling of a linear ramp: monotone along rows and columns, the mean kept, the corners near the old ones.
    assert (rows[:, 1:] > rows[:, :-1]).all() and (rows[1:] > rows[:-1]).all()
    assert torch.isclose(rows.mean(), grid.mean(), atol=1e-4) and abs(float(rows[0, 0])) < 0.6
    assert torch.equal(resample_pos_embed(pos, 4), pos)
    back = resample_pos_embed(up, 4)
    assert torch.allclose(back, pos, atol=0.3)


def test_an_encoder_loads_weights_trained_at_another_resolution():
    torch.manual_seed(0)
    small = MultimodalEncoder(CFG)
    large = MultimodalEncoder(EncoderConfig(**{**CFG.__dict__, "image_size": 24}))
    large.load_encoder_weights(small.state_dict())
    assert large.image_pos_embed.shape == (1, 1 + 64, 24)
    assert torch.equal(large.blocks[0].attn.to_q.weight, small.blocks[0].attn.to_q.weight)
    assert torch.allclose(large.image_pos_embed, resample_pos_embed(small.image_pos_embed, 8))
    assert large(images=torch.randn(2, 3, 24, 24)).image_states.shape == (2, 65, 24)


def test_padding_tokens_do_not_change_real_states():
    torch.manual_seed(0)
    enc = MultimodalEncoder(CFG).eval()
    images = torch.randn(5, 3, 12, 12)
    ids, mask = _text()
    a = enc(images=images, input_ids=ids, attention_mask=mask)
    ids2 = ids.clone()
    ids2[~mask] = 11  # garbage in padded positions must be invisible
    b = enc(images=images, input_ids=ids2, attention_mask=mask)
    torch.testing.assert_close(a.image_states, b.image_states)
    torch.testing.assert_close(a.text_states[mask], b.text_states[mask])


def test_wrong_image_size_and_too_long_text_fail_loudly():
    enc = MultimodalEncoder(CFG)
    with pytest.raises(ValueError, match="image size"):
        enc(images=torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="max_text_len"):
        enc(input_ids=torch.ones(1, 10, dtype=torch.long))


def test_patchify_orders_patches_in_raster_order():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).reshape(2, 3, 4, 4)
    patches = patchify(images, 2)
    assert patches.shape == (2, 4, 12)
    # Patch 1 is the top-right 2x2 block; its first pixel (row 0, col 2) in channel order.
    torch.testing.assert_close(patches[0, 1, :3], images[0, :, 0, 2])
    torch.testing.assert_close(patches[1, 2, 3:6], images[1, :, 2, 1])


def test_bert_masking_never_touches_special_or_padding_tokens():
    ids, mask = _text(B=64, T=9, seed=1)
    g = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(ids, mask, 0.3, mask_id=4, vocab_size=CFG.vocab_size, num_special=7, generator=g)
    chosen = labels != -100
    assert not chosen[~mask].any() and not chosen[:, 0].any()
    rate = chosen.sum() / (mask & (ids >= 7)).sum()
    assert 0.2 < rate < 0.4
    assert (masked[chosen] == 4).float().mean() > 0.6  # about 80 % become [MASK]
    torch.testing.assert_close(masked[~chosen], ids[~chosen])


def test_patch_mask_has_exact_ratio():
    m = random_patch_mask(7, 16, 0.5, "cpu")
    assert m.shape == (7, 16) and (m.sum(1) == 8).all()


def test_pretraining_every_objective_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = PretrainingModel(CFG, PretrainConfig(mlm_probability=0.5))
    images = torch.randn(5, 3, 12, 12)
    ids, mask = _text()
    out = model(images, ids, mask)
    assert set(out) == {"loss", "mim", "itc", "mlm", "itm"}
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_image_only_pretraining_uses_mim_alone():
    model = PretrainingModel(CFG, PretrainConfig(image_only=True))
    ids, mask = _text()
    out = model(torch.randn(5, 3, 12, 12), ids, mask)
    assert set(out) == {"loss", "mim"}
    torch.testing.assert_close(out["loss"], out["mim"])


def test_classifier_forward_backward_and_loss_only_with_labels():
    torch.manual_seed(0)
    model = EncoderForClassification(CFG, num_classes=5, label_smoothing=0.1)
    images = torch.randn(4, 3, 12, 12)
    out = model(images=images)
    assert out.logits.shape == (4, 5) and out.loss is None
    out = model(images=images, labels=torch.tensor([0, 1, 4, 2]))
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    # Unused by an image-only forward: text embeddings, the MIM mask token.
    assert set(no_grad) == {"encoder.mask_token", "encoder.token_embed.weight", "encoder.text_pos_embed"}


@pytest.mark.parametrize("mode,trainable_blocks", [("none", 2), ("encoder", 0), ("all-but-last-1", 1)])
def test_freeze_modes(mode, trainable_blocks):
    enc = MultimodalEncoder(CFG)
    enc.freeze(mode)
    trainable = [i for i, b in enumerate(enc.blocks) if all(p.requires_grad for p in b.parameters())]
    assert len(trainable) == trainable_blocks
    assert enc.patch_embed.proj.weight.requires_grad == (mode == "none")
    with pytest.raises(ValueError, match="unknown freeze mode"):
        enc.freeze("sometimes")


@pytest.mark.parametrize("masked", [False, True])
def test_matmul_attention_matches_the_fused_kernel(masked):
    """bf16 attention on CPU runs as two matrix products; values and gradients equal PyTorch's fused SDPA."""
    from imagen.models.layers import attention, matmul_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, requires_grad=True) for n in (5, 7, 7))
    mask = None
    if masked:
        mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
        mask[1, ..., 4:] = False
    ours = matmul_attention(q, k, v, mask)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    fused = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, fused)
    for a, b in zip(grads, torch.autograd.grad(fused.square().sum(), (q, k, v))):
        torch.testing.assert_close(a, b)
    # bf16 takes that path; fp32 keeps the fused kernel.
    q16, k16, v16 = (x.detach().bfloat16() for x in (q, k, v))
    assert torch.equal(attention(q16, k16, v16, mask), matmul_attention(q16, k16, v16, mask))
    torch.testing.assert_close(attention(q, k, v, mask), fused)


# -- ITC and ITM on hand-made cases ----------------------------------------------------------------------


def _lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


# Items 0 and 2 share a caption: each is a true match of the other, so both share the target mass.
DUP_LOGITS = [[1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [3.0, 0.0, 0.0]]
# Soft-target cross-entropy per row: logsumexp(row) - mean of the logits of its matches.
DUP_ITC = 0.5 * ((_lse(1, 0, 2) - 1.5 + _lse(0, 1, 0) - 1 + _lse(3, 0, 0) - 1.5) / 3     # image -> text
                 + (_lse(1, 0, 3) - 2 + _lse(0, 1, 0) - 1 + _lse(2, 0, 0) - 1) / 3)     # text -> image


def _itc_only(monkeypatch, logits):
    model = PretrainingModel(CFG, PretrainConfig(mim_weight=0, mlm_weight=0, itm_weight=0))
    monkeypatch.setattr(model, "contrastive_logits", lambda *a: torch.tensor(logits))
    return model


def test_itc_is_symmetric_infonce_with_exact_values(monkeypatch):
    ids, mask = _text(B=4)
    ids, mask = ids[:2], mask[:2]
    out = _itc_only(monkeypatch, [[2.0, 0.0], [1.0, 3.0]])(torch.zeros(2, 3, 12, 12), ids, mask)
    # rows: -log softmax at the diagonal = log(1 + e^-2) twice; columns: log(1 + e^-1), log(1 + e^-3)
    expected = 0.5 * (math.log1p(math.exp(-2)) + 0.5 * (math.log1p(math.exp(-1)) + math.log1p(math.exp(-3))))
    assert set(out) == {"loss", "itc"}
    assert out["itc"].item() == pytest.approx(expected, rel=1e-6)
    ids, mask = _text(B=4)
    ids, mask = ids[:3].clone(), mask[:3].clone()
    ids[2], mask[2] = ids[0], mask[0]  # a duplicate caption
    out = _itc_only(monkeypatch, DUP_LOGITS)(torch.zeros(3, 3, 12, 12), ids, mask)
    assert out["itc"].item() == pytest.approx(DUP_ITC, rel=1e-6)


def test_contrastive_logits_are_scaled_cosine_similarities(monkeypatch):
    model = PretrainingModel(CFG, PretrainConfig(), proj_dim=CFG.dim)
    with torch.no_grad():
        for proj in (model.image_proj, model.text_proj):
            proj.weight.copy_(torch.eye(CFG.dim))
            proj.bias.zero_()
        model.logit_scale.fill_(math.log(200.0))  # above the cap: CLIP clamps the scale at 100
    img, txt = torch.zeros(2, CFG.dim), torch.zeros(2, CFG.dim)
    img[0, 0], img[1, :2] = 3.0, torch.tensor([1.0, 1.0])
    txt[0, 0], txt[1, 1] = 0.5, 2.0

    model.encoder = StubEncoder(lambda *a: SimpleNamespace(image_embed=img, text_embed=txt))
    c = 1 / math.sqrt(2)
    torch.testing.assert_close(model.contrastive_logits(None, None, None), 100 * torch.tensor([[1.0, 0.0], [c, c]]))


class StubEncoder(torch.nn.Module):
    """Stands in for the encoder: forward(images, input_ids, attention_mask) -> whatever `fn` returns."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, images=None, input_ids=None, attention_mask=None):
        return self.fn(images, input_ids, attention_mask)


class MatchEncoder(torch.nn.Module):
    """Stands in for the fused pass: image_embed[:, 0] = 1 where image and caption show the same class.

    Image i is filled with its class; caption i's second token is 7 + its class.
    """

    def forward(self, images=None, input_ids=None, attention_mask=None):
        match = (images.flatten(1)[:, 0] == (input_ids[:, 1] - 7).float()).float()
        embed = torch.zeros(len(images), CFG.dim)
        embed[:, 0] = match
        return SimpleNamespace(image_embed=embed)


def _itm_case(classes, logits, seed=0):
    torch.manual_seed(seed)
    model = PretrainingModel(CFG, PretrainConfig())
    model.encoder = MatchEncoder()
    with torch.no_grad():  # no-match logit 0, match logit 2 * match
        model.itm_head.weight.zero_()
        model.itm_head.bias.zero_()
        model.itm_head.weight[1, 0] = 2.0
    B = len(classes)
    images = torch.tensor(classes, dtype=torch.float)[:, None, None, None].expand(B, 3, 12, 12)
    ids = torch.full((B, 4), 9)
    ids[:, 0], ids[:, 1] = 2, 7 + torch.tensor(classes)
    same = (ids[:, None] == ids[None]).all(-1)
    return model.itm_loss(images, ids, torch.ones(B, 4, dtype=torch.bool), torch.tensor(logits), same).item()


def test_itm_loss_exact_values_on_positives_and_hard_negatives():
    pos, neg = math.log1p(math.exp(-2)), math.log(2)  # a true pair scores [0, 2]; a true negative [0, 0]
    # Distinct captions: B positives and 2B negatives (a text for each image, an image for each text).
    assert _itm_case([0, 1, 2], torch.zeros(3, 3).tolist()) == pytest.approx((3 * pos + 6 * neg) / 9, rel=1e-6)
    # Items 0 and 1 share a caption: neither may be drawn as the other's negative, whatever the seed.
    for seed in range(5):
        assert _itm_case([0, 0, 1], torch.zeros(3, 3).tolist(), seed) == pytest.approx((3 * pos + 6 * neg) / 9, rel=1e-6)
    # Every caption the same: no negative exists; the fallback draws the other item, labelled a match.
    assert _itm_case([0, 0], torch.zeros(2, 2).tolist()) == pytest.approx(pos, rel=1e-6)


def test_itm_hard_negatives_follow_the_itc_softmax():
    # Each image i scores itself 5, text i+1 log 3, text i+2 0 and the rest -1e4 (cyclically): with the positive
    # excluded, its negative text is i+1 with probability 3 / (3 + 1) and i+2 with 1 / 4; likewise per text.
    N = 2000
    model = PretrainingModel(CFG, PretrainConfig())
    seen = {}

    def encoder(images, input_ids, attention_mask):
        seen["ids"], seen["images"] = input_ids[:, 1], images[:, 0]
        return SimpleNamespace(image_embed=torch.zeros(len(images), CFG.dim))

    model.encoder = StubEncoder(encoder)
    i = torch.arange(N)
    logits = torch.full((N, N), -1e4)
    logits[i, i], logits[i, (i + 1) % N], logits[i, (i + 2) % N] = 5.0, math.log(3), 0.0
    ids = torch.stack([torch.full((N,), 2), i], 1)  # the stub reads the index off the caption, never embeds it
    torch.manual_seed(0)
    model.itm_loss(i.float()[:, None], ids, torch.ones(N, 2, dtype=torch.bool), logits, torch.eye(N, dtype=torch.bool))
    neg_text = (seen["ids"][N:2 * N] - i) % N  # offset of each image's negative text
    neg_image = (i - seen["images"][2 * N:].long()) % N  # each text's negative image sits this far before it
    for offsets in (neg_text, neg_image):
        assert set(offsets.tolist()) <= {1, 2}  # never the positive, never a -1e4 item
        assert (offsets == 1).float().mean().item() == pytest.approx(0.75, abs=0.03)  # standard error 0.01


def test_mae_encoder_sees_only_the_visible_patches():
    cfg = EncoderConfig(image_size=16, patch_size=4, stem_channels=4, stem_layers=2, vocab_size=37, max_text_len=9,
                        dim=24, num_layers=1, num_heads=3)
    model = PretrainingModel(cfg, PretrainConfig(image_only=True, mim_mask_ratio=0.75, mim_decoder_layers=1,
                                                 mim_decoder_dim=32)).eval()
    assert model.mim_head is None and model.mim_decoder is not None
    images = torch.randn(3, 3, 16, 16)
    mask = random_patch_mask(3, 16, 0.75, images.device)
    full = model.encoder.embed_image(images)  # (3, 17, 24)
    kept = model.encoder.embed_image(images, mask, drop_masked=True)
    assert kept.shape == (3, 1 + 4, 24)
    for b in range(3):  # [CLS] then the visible patches in raster order, position embeddings included
        torch.testing.assert_close(kept[b], full[b, [0] + [1 + i for i in range(16) if not mask[b, i]]])
    states = model.encoder(images=images, patch_mask=mask, drop_masked=True).image_states
    pred = model.mim_decoder(states, mask)
    assert pred.shape == (3, 16, 4 * 4 * 3)
    with pytest.raises(ConfigError, match="mim_mask_ratio"):
        PretrainConfig(mim_mask_ratio=1.0)
    with pytest.raises(ConfigError, match="multiple of 32"):
        PretrainingModel(cfg, PretrainConfig(mim_decoder_layers=1, mim_decoder_dim=48))


def test_mae_pretraining_learns_to_fill_in_patches():
    torch.manual_seed(0)
    cfg = EncoderConfig(image_size=16, patch_size=4, vocab_size=37, max_text_len=9, dim=32, num_layers=1, num_heads=2)
    model = PretrainingModel(cfg, PretrainConfig(image_only=True, mim_mask_ratio=0.5, mim_decoder_layers=1))
    # Images that are one horizontal ramp each: a masked patch is predictable from the visible ones.
    ramp = torch.linspace(-1, 1, 16).view(1, 1, 1, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        images = (ramp * torch.rand(8, 1, 1, 1) * 2).expand(-1, 3, 16, -1)
        loss = model(images=images)["mim"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.3 * sum(losses[:10]) / 10
