"""Encoder, pretraining heads and classification head: shapes, masks, gradients, freezing."""

import pytest
import torch

from imagen.config import EncoderConfig, PretrainConfig
from imagen.models import EncoderForClassification, MultimodalEncoder, PretrainingModel, patchify
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
