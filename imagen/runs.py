"""Run directories: the one lifecycle that creates or resumes them, and their config.json.

Layout (DESIGN.md): config.json, tokenizer.json, model.safetensors, metrics.jsonl, checkpoints/, eval/.
A run is complete only once model.safetensors exists; the trainer writes it last, atomically. Loading a
finished run back as a model needs its task, so `load` lives with the tasks (imagen/tasks/loading.py).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from imagen.errors import RunError
from imagen.config import EncoderConfig, TrainConfig, from_dict, to_dict
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
    """Everything config.json holds: which task, the model, the training setup, the task's options and the data.

    The task's options (its `Config` dataclass) are kept as a dict under "task_config"; the task turns them back
    into its dataclass. Runs written before every task spoke one contract kept them under the task's own name
    ("classify", "pretrain"), which `from_json` still reads.
    """

    task: str
    model: EncoderConfig
    train: TrainConfig
    task_config: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    freeze: str = "none"

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "model": to_dict(self.model), "train": to_dict(self.train),
                "task_config": self.task_config, "class_names": self.class_names, "data": self.data,
                "init_from": self.init_from, "freeze": self.freeze}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunConfig":
        try:
            options = data.get("task_config")
            if options is None:
                options = data.get(data["task"])  # the earlier place: a section named after the task
            return cls(
                task=data["task"],
                model=from_dict(EncoderConfig, data["model"]),
                train=from_dict(TrainConfig, data.get("train", {})),
                task_config=dict(options or {}),
                class_names=data.get("class_names"),
                data=data.get("data", {}),
                init_from=data.get("init_from"),
                freeze=data.get("freeze", "none"),
            )
        except (TypeError, ValueError, KeyError) as e:
            raise RunError(f"config.json does not describe a valid run: {e}") from None


def load_tokenizer(run: str | Path) -> Tokenizer | None:
    """The run's tokenizer.json, or None for a run without text (image-only)."""
    path = Path(run) / TOKENIZER_NAME
    return Tokenizer.load(path) if path.is_file() else None
