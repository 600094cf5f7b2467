"""Clipping of the predicted x0 at each sampling step: static, and Imagen's dynamic thresholding."""

from __future__ import annotations

import torch

from imagen.config import DEFAULT_PERCENTILE, THRESHOLD_NAMES

THRESHOLDS = THRESHOLD_NAMES


def static_threshold(x0: torch.Tensor) -> torch.Tensor:
    """Clamp pred_x0 to the data range [-1, 1] (Saharia et al. 2022, "Imagen", sec. 2.3)."""
    return x0.clamp(-1.0, 1.0)


def dynamic_threshold(x0: torch.Tensor, percentile: float = DEFAULT_PERCENTILE, max_scale: float | None = None) -> torch.Tensor:
    """Imagen sec. 2.3: s = per-sample percentile of |x0|, s = max(s, 1); x0 = clamp(x0, -s, s) / s."""
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"percentile must be in (0, 1], got {percentile}")
    flat = x0.detach().abs().flatten(1)  # (B, N)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))  # quantile needs float32/64; keep float64
    s = torch.quantile(flat, percentile, dim=1).to(x0.dtype)  # (B,) linear interpolation between ranks
    # s >= 1 leaves samples already inside [-1, 1] untouched; a cap keeps rare outliers from flattening contrast.
    s = s.clamp(min=1.0, max=max_scale)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, ..., 1)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def apply_threshold(x0: torch.Tensor, mode: str, percentile: float = DEFAULT_PERCENTILE) -> torch.Tensor:
    """Threshold pred_x0 by mode: "dynamic", "static" or "none"."""
    if mode == "dynamic":
        return dynamic_threshold(x0, percentile)
    if mode == "static":
        return static_threshold(x0)
    if mode == "none":
        return x0
    raise ValueError(f"unknown threshold {mode!r}; choose one of {list(THRESHOLDS)}")
