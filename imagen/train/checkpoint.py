"""Atomic safetensors weights and full training checkpoints (model, optimiser, schedule, RNG, loop position).

A checkpoint is written into a hidden temporary directory and renamed into place, and `trainer_state.json` is
its last file: a crash mid-save never leaves a directory that `latest_checkpoint` would pick up.
Nothing is read back with unrestricted pickle: weights are safetensors, the rest `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from imagen.errors import CheckpointError
from imagen.atomic import atomic_dir, atomic_path, write_json

from .optim import load_optimizer_state

CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng.pt"  # rank 0's random streams; rank r > 0 of a multi-process run: rng-rank-r.pt
_STEP_DIR = re.compile(r"^step-(\d+)$")



# ----------------------------------------------------------------------------------------------
# Weights


def _savable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict made safetensors-ready: contiguous, on CPU, no two entries sharing storage."""
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        # Tied weights (e.g. input embedding = output projection) share storage, which safetensors refuses:
        # store each name as its own copy; load_state_dict writes both back into the one shared tensor.
        if key in seen:
            tensor = tensor.clone()
        seen.add(key)
        tensors[name] = tensor.contiguous().cpu()
    return tensors


def save_weights(path: str | os.PathLike, model: nn.Module) -> Path:
    """Write the model's weights to a safetensors file atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        save_file(_savable_state_dict(model), str(tmp), metadata={"format": "pt"})
    return Path(path)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file into CPU tensors, raising CheckpointError when it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; check the run directory or re-run training")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{path} is damaged or not a safetensors file ({reason}); "
            "delete it and resume from an earlier checkpoint or re-run training"
        ) from None


def load_weights(path: str | os.PathLike, model: nn.Module) -> None:
    """Load safetensors weights into `model`, raising CheckpointError on damage or any key / shape mismatch."""
    tensors = read_weights(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"missing {_preview(missing)}")
        if unexpected:
            problems.append(f"unexpected {_preview(unexpected)}")
        if wrong_shape:
            k = wrong_shape[0]
            problems.append(
                f"{len(wrong_shape)} shape mismatch(es), e.g. {k}: file {tuple(tensors[k].shape)} "
                f"vs model {tuple(expected[k].shape)}"
            )
        raise CheckpointError(
            f"{path} does not fit this model ({'; '.join(problems)}); load it into the model config it was trained with"
        )
    model.load_state_dict(tensors)


def _preview(names: list[str], limit: int = 3) -> str:
    """'a, b, c (+N more)' for a one-line message."""
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ----------------------------------------------------------------------------------------------
# Full training checkpoints


def _step_dirs(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory of a run (one whose trainer_state.json exists), or None."""
    found = _step_dirs(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    run_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict,
    rng_state: dict | list[dict],
    *,
    scaler=None,
    keep: int = 2,
) -> Path:
    """Write RUN/checkpoints/step-XXXXXXXX/ atomically and keep only the newest `keep` step checkpoints.

    `rng_state` is one process's RNG state, or a list of every rank's (a multi-process run) in rank order."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{int(trainer_state['step']):08d}"
    # replace: the same step saved twice (e.g. Ctrl-C right after a periodic save)
    with atomic_dir(final, replace=True) as tmp:
        save_weights(tmp / "model.safetensors", model)
        training = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        if scaler is not None:
            training["scaler"] = scaler.state_dict()
        torch.save(training, tmp / "optimizer.pt")
        rng_states = rng_state if isinstance(rng_state, list) else [rng_state]
        for rank, state in enumerate(rng_states):
            torch.save(state, tmp / _rng_file(rank))
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))  # last: marks the checkpoint complete
    for _, old in _step_dirs(run_dir)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _rng_file(rank: int) -> str:
    return RNG_FILE if rank == 0 else f"rng-rank-{rank}.pt"


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer=None, scheduler=None, scaler=None):
    """Restore model / optimiser / scheduler (/ scaler) in place; return (trainer_state, rng_states), the RNG state
    of every rank that wrote it, in rank order (one for a single-process run)."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint ({STATE_FILE} is missing); resume from another one")
    load_weights(path / "model.safetensors", model)
    try:
        training = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        trainer_state = json.loads((path / STATE_FILE).read_text())
        ranks = int(trainer_state.get("world_size", 1))
        rng_states = [torch.load(path / _rng_file(r), map_location="cpu", weights_only=True) for r in range(ranks)]
    except Exception as exc:  # noqa: BLE001 - any unreadable file means the same thing to the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is damaged ({reason}); delete it to resume from an earlier one"
        ) from None
    if optimizer is not None:
        load_optimizer_state(optimizer, training["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(training["scheduler"])
    if scaler is not None and "scaler" in training:
        scaler.load_state_dict(training["scaler"])
    return trainer_state, rng_states


def save_best(run_dir: str | os.PathLike, model: nn.Module, info: dict) -> Path:
    """Keep the best model so far as RUN/checkpoints/best/model.safetensors (+ best.json with step and metric)."""
    best = Path(run_dir) / CHECKPOINTS_DIR / BEST_DIR
    best.mkdir(parents=True, exist_ok=True)
    path = save_weights(best / "model.safetensors", model)
    write_json(best / "best.json", info)
    return path


def best_weights_path(run_dir: str | os.PathLike) -> Path:
    """Where `save_best` keeps the best weights."""
    return Path(run_dir) / CHECKPOINTS_DIR / BEST_DIR / "model.safetensors"


def check_world_size(trainer_state: dict, rng_states: list, world_size: int, path) -> None:
    """Refuse to resume with another number of processes than the checkpoint was written by."""
    saved = int(trainer_state.get("world_size", len(rng_states)))
    if saved != world_size:
        raise CheckpointError(f"checkpoint {path} was written by {saved} process(es) but this run has {world_size}; "
                              f"resume it with {saved} (--nproc {saved} or torchrun --nproc-per-node {saved})")
