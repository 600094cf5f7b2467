"""Run directories: create one safely, write its config, and load a finished run back as a model.

Layout (DESIGN.md): config.json, tokenizer.json, model.safetensors, metrics.jsonl, checkpoints/, eval/.
A run is complete only once model.safetensors exists; the trainer writes it last, atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from imagen.errors import RunError
from imagen.config import ClassifyConfig, EncoderConfig, PretrainConfig, TrainConfig, from_dict
from imagen.data.tokenizer import Tokenizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"




def check_new_run_dir(out: Path) -> None:
    """Refuse an --out that would overwrite something: it must be absent or an empty folder."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; choose a directory path")
    if out.exists() and any(out.iterdir()):
        raise RunError(f"--out {out} already exists and is not empty; choose a new directory or pass --resume to continue it")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunError(f"--out {out}: {parent} is a file, not a folder; choose another path")
            if not os.access(parent, os.W_OK):
                raise RunError(f"--out {out}: cannot write in {parent} (permission denied); choose a folder you can write to")
            break


@contextmanager
def run_setup(out: str | Path, resume: bool) -> Iterator[Path]:
    """The run directory while a command sets a run up (config, tokenizer, data, model): one lifecycle for all.

    A fresh run's `out` must be absent or empty; it is created, and if setup fails (a bad option, unreadable
    data, Ctrl-C) everything set up in it is removed again, so no half-made run is left behind. With `resume`
    it must hold a run's config.json, and it is left as it was whatever happens.
    """
    out = Path(out)
    if resume:
        if not (out / CONFIG_NAME).is_file():
            raise RunError(f"cannot resume: {out} is not a run directory (no {CONFIG_NAME}); start a new run without --resume")
        yield out
        return
    check_new_run_dir(out)
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        if existed:  # it was empty before: empty it again
            for child in out.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() and not child.is_symlink() else child.unlink(missing_ok=True)
        else:
            shutil.rmtree(out, ignore_errors=True)
        raise


def read_config(run: str | Path) -> dict[str, Any]:
    """The parsed config.json of a run directory, with one-line errors for anything wrong."""
    run = Path(run)
    if not run.exists():
        raise RunError(f"run directory {run} does not exist")
    path = run / CONFIG_NAME
    if not path.is_file():
        raise RunError(f"{run} is not a run directory (no {CONFIG_NAME}); pass the --out folder of an imagen pretrain/finetune run")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is damaged ({e.msg if hasattr(e, 'msg') else e}); re-run training to recreate it") from None
    if isinstance(config, dict) and config.get("task") == "text-to-image":
        raise RunError(f"{run} is a text-to-image run; use `imagen generate` or `imagen evaluate-t2i` with it")
    if not isinstance(config, dict) or "task" not in config or "model" not in config:
        raise RunError(f"{path} is not an imagen run config (missing 'task' or 'model')")
    return config


@dataclass
class RunConfig:
    """Everything config.json holds: which task, the model, the training setup and the data it saw."""

    task: str
    model: EncoderConfig
    train: TrainConfig
    pretrain: PretrainConfig | None = None
    classify: ClassifyConfig | None = None
    class_names: list[str] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    freeze: str = "none"
    task_config: dict[str, Any] | None = None  # the task's own options (tasks/<task>.py Config)

    def to_json(self) -> dict[str, Any]:
        from imagen.config import to_dict

        out = {"task": self.task, "model": to_dict(self.model), "train": to_dict(self.train)}
        if self.pretrain is not None:
            out["pretrain"] = to_dict(self.pretrain)
        if self.classify is not None:
            out["classify"] = to_dict(self.classify)
        out.update(class_names=self.class_names, data=self.data, init_from=self.init_from, freeze=self.freeze)
        if self.task_config is not None:
            out["task_config"] = self.task_config
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunConfig":
        try:
            return cls(
                task=data["task"],
                model=from_dict(EncoderConfig, data["model"]),
                train=from_dict(TrainConfig, data.get("train", {})),
                pretrain=from_dict(PretrainConfig, data["pretrain"]) if data.get("pretrain") else None,
                classify=from_dict(ClassifyConfig, data["classify"]) if data.get("classify") else None,
                class_names=data.get("class_names"),
                data=data.get("data", {}),
                init_from=data.get("init_from"),
                freeze=data.get("freeze", "none"),
                task_config=data.get("task_config"),
            )
        except (TypeError, ValueError, KeyError) as e:
            raise RunError(f"config.json does not describe a valid run: {e}") from None


def build_model(rc: RunConfig, tokenizer: Tokenizer | None = None) -> torch.nn.Module:
    """The network a run config describes, freshly initialised."""
    from imagen.models.heads import EncoderForClassification
    from imagen.models.pretraining import PretrainingModel

    if rc.task == "pretrain":
        mask_id = tokenizer.mask_id if tokenizer is not None else 4
        return PretrainingModel(rc.model, rc.pretrain or PretrainConfig(), mask_id=mask_id)
    if rc.task == "classify":
        c = rc.classify or ClassifyConfig()
        return EncoderForClassification(rc.model, len(rc.class_names or []), c.label_smoothing, rc.model.dropout, c.pooling)
    from imagen.tasks.registry import TASKS

    task = TASKS.get(rc.task)
    if task is not None and hasattr(task, "build_model"):
        return task.build_model(rc, tokenizer)
    raise RunError(f"this version of imagen cannot build models for task {rc.task!r}")


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


def load_tokenizer(run: Path) -> Tokenizer | None:
    path = Path(run) / TOKENIZER_NAME
    return Tokenizer.load(path) if path.is_file() else None


def load(run: str | Path, map_location: str = "cpu") -> LoadedRun:
    """Rebuild a finished run's model from config.json + model.safetensors (no pickle involved)."""
    from imagen.train.checkpoint import load_weights

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
