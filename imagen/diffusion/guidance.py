"""Classifier-free guidance as a wrapper around any denoiser callable; one batched forward pass per step."""

from __future__ import annotations

from collections.abc import Callable

import torch


def _match_batch(null_cond: dict, cond: dict, batch: int) -> dict:
    # The null condition is often a single embedding of the empty prompt: broadcast it to the batch.
    if set(null_cond) != set(cond):
        raise ValueError(f"null/negative condition keys {sorted(null_cond)} do not match condition keys {sorted(cond)}")
    out = {}
    for k, v in null_cond.items():
        if v.shape[0] == batch:
            out[k] = v
        elif v.shape[0] == 1:
            out[k] = v.expand(batch, *v.shape[1:])
        else:
            raise ValueError(f"null/negative condition {k!r} has batch {v.shape[0]}, expected 1 or {batch}")
    return out


def classifier_free_guidance(
    denoiser: Callable[..., torch.Tensor],
    null_cond: dict,
    *,
    scale: float | torch.Tensor,
    negative_cond: dict | None = None,
) -> Callable[..., torch.Tensor]:
    """Guided denoiser uncond + scale * (cond - uncond) (Ho & Salimans 2022, eq. 6), both halves in one call.

    `scale` is a number, or a tensor that broadcasts against the output (one scale per sample: (B, 1, 1, 1)).
    `negative_cond` (e.g. a negative prompt), when given, takes the place of `null_cond`.
    """
    uncond_source = null_cond if negative_cond is None else negative_cond

    def guided(x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        B = x_t.shape[0]
        uncond = _match_batch(uncond_source, cond, B)
        # Conditional half first, then unconditional: (2B, ...) for every input.
        both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        out = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), **both)
        out_cond, out_uncond = out[:B], out[B:]
        return out_uncond + scale * (out_cond - out_uncond)

    return guided


def composed_guidance(
    denoiser: Callable[..., torch.Tensor],
    null_cond: dict,
    *,
    weights: torch.Tensor,
    negative_cond: dict | None = None,
) -> Callable[..., torch.Tensor]:
    """Composable diffusion's conjunction (Liu et al. 2022, "Compositional Visual Generation with Composable
    Diffusion Models", eq. 12): uncond + sum_k w_k * (cond_k - uncond), every part and the unconditional branch in
    one call.

    The guided denoiser's `cond` holds K parts per sample, part-major: rows [k * B, (k + 1) * B) are part k of the
    B samples. `weights` (K, B) is each part's scale per sample; 0 leaves a part out (a prompt with fewer parts than
    another in its batch pads with weight-0 parts). With K = 1 this is `classifier_free_guidance`.
    """
    if weights.dim() != 2:
        raise ValueError(f"weights must be (parts, batch), got shape {tuple(weights.shape)}")
    K, B = weights.shape
    uncond_source = null_cond if negative_cond is None else negative_cond

    def guided(x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        if x_t.shape[0] != B:
            raise ValueError(f"composed guidance was built for batch {B}, got {x_t.shape[0]} samples")
        uncond = _match_batch(uncond_source, {k: v[:B] for k, v in cond.items()}, B)
        # The K parts, then the unconditional branch: ((K + 1) B, ...) for every input.
        every = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        out = denoiser(x_t.repeat(K + 1, *([1] * (x_t.dim() - 1))), t.repeat(K + 1), **every)
        out = out.view(K + 1, B, *out.shape[1:])
        parts, out_uncond = out[:K], out[K]
        w = weights.to(device=out.device, dtype=out.dtype).view(K, B, *([1] * (out.dim() - 2)))
        return out_uncond + (w * (parts - out_uncond)).sum(0)

    return guided
