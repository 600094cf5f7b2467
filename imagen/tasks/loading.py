"""Finished runs back as models: config.json + model.safetensors (+ tokenizer.json) through the run's task."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from imagen.data.tokenizer import Tokenizer
from imagen.errors import RunError, UnknownTaskError
from imagen.runs import WEIGHTS_NAME, RunConfig, load_tokenizer, read_config
from imagen.tasks.registry import get_task
from imagen.train.checkpoint import load_weights


def build_model(rc: RunConfig, tokenizer: Tokenizer | None = None) -> torch.nn.Module:
    """The network a run config describes, freshly initialised."""
    try:
        task = get_task(rc.task)
    except UnknownTaskError:
        raise RunError(f"this version of imagen cannot build models for task {rc.task!r}") from None
    return task.build_model(rc, tokenizer)


@dataclass
class LoadedRun:
    """A finished run: its model (eval mode), tokenizer and config."""

    path: Path
    config: RunConfig
    model: torch.nn.Module
    tokenizer: Tokenizer | None

    @property
    def task(self) -> str:
        return self.config.task

    @property
    def class_names(self) -> list[str] | None:
        return self.config.class_names


def load(run: str | Path, map_location: str = "cpu") -> LoadedRun:
    """Rebuild a finished run's model from config.json + model.safetensors (no pickle involved)."""
    run = Path(run)
    rc = RunConfig.from_json(read_config(run))
    weights = run / WEIGHTS_NAME
    if not weights.is_file():
        raise RunError(f"{run} is not a finished run (no {WEIGHTS_NAME}); finish it with --resume or train again")
    tokenizer = load_tokenizer(run)
    model = build_model(rc, tokenizer)
    load_weights(weights, model)
    model.to(map_location).eval()
    return LoadedRun(path=run, config=rc, model=model, tokenizer=tokenizer)
