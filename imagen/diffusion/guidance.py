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
