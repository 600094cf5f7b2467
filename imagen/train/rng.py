"""Seeding and the capture / restore of every random number generator, for exact resume."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python `random`, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def get_rng_state() -> dict:
    """All RNG states as plain lists / ints / tensors, so `torch.load(weights_only=True)` can read them back."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss_next],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state(),
    }
    # Only read CUDA states when CUDA is already in use: querying them would otherwise create a CUDA context.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore RNG states captured by `get_rng_state`."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        for index, cuda_state in enumerate(cuda_states):
            torch.cuda.set_rng_state(cuda_state, index)
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for one epoch of one run (SeedSequence avoids (seed, epoch) collisions)."""
    words = np.random.SeedSequence([seed % 2**32, epoch]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])
