"""Classifier-free guidance (one batched call, scale limits, negative condition), composed guidance and thresholding."""

import pytest
import torch

from imagen.diffusion import apply_threshold, classifier_free_guidance, composed_guidance, dynamic_threshold, static_threshold

B, TOK, D = 3, 4, 5


class CondDenoiser:
    """Output depends on x_t, t and every condition key; counts calls and batch sizes."""

    def __init__(self):
        self.batches = []

    def __call__(self, x_t, t, text_states, text_mask, text_embed):
        self.batches.append(x_t.shape[0])
        pooled = (text_states * text_mask[..., None]).sum(1).mean(-1)  # (B,)
        return 0.5 * x_t + (t.double() / 100 + pooled + text_embed.sum(-1))[:, None, None]


def _cond(seed, batch=B):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, TOK, dtype=torch.bool)
    mask[0, 2:] = False
    return {
        "text_states": torch.randn(batch, TOK, D, generator=g, dtype=torch.float64),
        "text_mask": mask,
        "text_embed": torch.randn(batch, D, generator=g, dtype=torch.float64),
    }


def _inputs():
    g = torch.Generator().manual_seed(9)
    return torch.randn(B, 2, 3, generator=g, dtype=torch.float64), torch.tensor([10, 500, 999])


@pytest.mark.parametrize("scale", [0.0, 1.0, 7.5])
def test_guidance_combines_in_one_forward_pass(scale):
    x_t, t = _inputs()
    cond, null = _cond(1), _cond(2)
    raw = CondDenoiser()
    guided = classifier_free_guidance(raw, null, scale=scale)
    out = guided(x_t, t, **cond)
    assert raw.batches == [2 * B]  # conditional and unconditional halves in one call

    ref = CondDenoiser()
    out_cond, out_uncond = ref(x_t, t, **cond), ref(x_t, t, **null)
    torch.testing.assert_close(out, out_uncond + scale * (out_cond - out_uncond), rtol=1e-12, atol=1e-12)
    if scale == 1.0:
        torch.testing.assert_close(out, out_cond, rtol=1e-12, atol=1e-12)
    if scale == 0.0:
        torch.testing.assert_close(out, out_uncond, rtol=1e-12, atol=1e-12)


def test_negative_condition_replaces_null():
    x_t, t = _inputs()
    cond, null, negative = _cond(1), _cond(2), _cond(3)
    guided = classifier_free_guidance(CondDenoiser(), null, scale=4.0, negative_cond=negative)
    ref = CondDenoiser()
    out_cond, out_neg = ref(x_t, t, **cond), ref(x_t, t, **negative)
    torch.testing.assert_close(guided(x_t, t, **cond), out_neg + 4.0 * (out_cond - out_neg), rtol=1e-12, atol=1e-12)


def test_composed_guidance_is_the_conjunction_formula_in_one_call():
    # Liu et al. 2022, eq. 12: uncond + sum_k w_k (cond_k - uncond); a weight-0 part is left out.
    x_t, t = _inputs()
    parts, null = [_cond(1), _cond(4), _cond(5)], _cond(2)
    weights = torch.tensor([[3.0, 3.0, 3.0], [3.0, 2.0, 0.0], [3.0, 0.0, 0.0]], dtype=torch.float64)  # (K, B)
    raw = CondDenoiser()
    stacked = {k: torch.cat([part[k] for part in parts]) for k in null}  # part-major: rows k * B .. (k + 1) * B
    out = composed_guidance(raw, null, weights=weights)(x_t, t, **stacked)
    assert raw.batches == [4 * B]  # three parts and the unconditional branch in one call

    ref = CondDenoiser()
    uncond = ref(x_t, t, **null)
    expected = uncond + sum(weights[k][:, None, None] * (ref(x_t, t, **parts[k]) - uncond) for k in range(3))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # Sample 2 has one real part: plain classifier-free guidance of it.
    cfg = classifier_free_guidance(CondDenoiser(), null, scale=3.0)(x_t, t, **parts[0])
    torch.testing.assert_close(out[2], cfg[2], rtol=1e-12, atol=1e-12)


def test_composed_guidance_of_one_part_equals_classifier_free_guidance():
    x_t, t = _inputs()
    cond, null, negative = _cond(1), _cond(2), _cond(3)
    for neg in (None, negative):
        composed = composed_guidance(CondDenoiser(), null, weights=torch.full((1, B), 4.0), negative_cond=neg)
        cfg = classifier_free_guidance(CondDenoiser(), null, scale=4.0, negative_cond=neg)
        assert torch.equal(composed(x_t, t, **cond), cfg(x_t, t, **cond))
    with pytest.raises(ValueError, match="batch 3"):
        composed_guidance(CondDenoiser(), null, weights=torch.ones(1, B))(x_t[:2], t[:2], **_cond(1, batch=2))


def test_single_null_condition_broadcasts_to_batch():
    x_t, t = _inputs()
    cond, null = _cond(1), _cond(2, batch=1)
    out = classifier_free_guidance(CondDenoiser(), null, scale=0.0)(x_t, t, **cond)
    null_b = {k: v.expand(B, *v.shape[1:]) for k, v in null.items()}
    torch.testing.assert_close(out, CondDenoiser()(x_t, t, **null_b), rtol=1e-12, atol=1e-12)


def test_mismatched_condition_keys_fail_loudly():
    x_t, t = _inputs()
    null = {"text_embed": torch.zeros(1, D)}
    with pytest.raises(ValueError, match="do not match"):
        classifier_free_guidance(CondDenoiser(), null, scale=2.0)(x_t, t, **_cond(1))


# Thresholding (Imagen sec. 2.3). Sample 0 has a large range; sample 1 is inside [-1, 1], so s = max(s, 1) = 1.
CRAFTED = torch.tensor([[0.5, -2.0, 3.0, -4.0, 1.0], [0.1, -0.2, 0.3, 0.4, -0.5]], dtype=torch.float64)


def test_dynamic_threshold_exact():
    # sorted |x0| of sample 0 = [0.5, 1, 2, 3, 4]; percentile 0.9 sits at rank 0.9 * 4 = 3.6 -> s = 3 + 0.6 * 1
    s = 3.6
    out = dynamic_threshold(CRAFTED, percentile=0.9)
    expected0 = [0.5 / s, -2.0 / s, 3.0 / s, -1.0, 1.0 / s]
    assert out[0].tolist() == pytest.approx(expected0, rel=1e-12)
    assert out[1].tolist() == pytest.approx(CRAFTED[1].tolist(), rel=1e-12)  # s = 0.4 -> 1: untouched


def test_dynamic_threshold_on_images_and_cap():
    # Rank 0.75 * 4 = 3 exactly -> s = 3.
    out = dynamic_threshold(CRAFTED.reshape(2, 1, 5, 1), percentile=0.75)
    assert out.shape == (2, 1, 5, 1)
    assert out[0].flatten().tolist() == pytest.approx([0.5 / 3, -2 / 3, 1.0, -1.0, 1 / 3], rel=1e-12)
    capped = dynamic_threshold(CRAFTED, percentile=0.9, max_scale=2.0)
    assert capped[0].tolist() == pytest.approx([0.25, -1.0, 1.0, -1.0, 0.5], rel=1e-12)


def test_static_and_apply_threshold():
    assert static_threshold(CRAFTED)[0].tolist() == [0.5, -1.0, 1.0, -1.0, 1.0]
    assert torch.equal(apply_threshold(CRAFTED, "none"), CRAFTED)
    assert torch.equal(apply_threshold(CRAFTED, "static"), static_threshold(CRAFTED))
    assert torch.equal(apply_threshold(CRAFTED, "dynamic", 0.9), dynamic_threshold(CRAFTED, 0.9))
    with pytest.raises(ValueError, match=r"unknown threshold 'soft'.*dynamic.*static.*none"):
        apply_threshold(CRAFTED, "soft")
