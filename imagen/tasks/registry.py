"""The task registry: name -> task class, the one place that lists the tasks.

Entries name their class as "module:Class" and are imported on first use, so reading the names (the CLI's
help) needs no torch. A test may put a class in place of an entry.
"""

from __future__ import annotations

import importlib

from imagen.errors import UnknownTaskError

TASKS: dict[str, object] = {
    "pretrain": "imagen.tasks.pretrain:PretrainTask",
    "classify": "imagen.tasks.classify:ClassifyTask",
    "vqa": "imagen.tasks.vqa:VQATask",
    "retrieval": "imagen.tasks.retrieval:RetrievalTask",
    "caption": "imagen.tasks.caption:CaptionTask",
    "detect": "imagen.tasks.detect:DetectTask",
    "instruct": "imagen.tasks.instruct:InstructTask",
}

# Names a user may pass to `imagen finetune --task` (pretraining has its own command).
FINETUNE_TASKS = tuple(name for name in TASKS if name != "pretrain")


def get_task(name: str, finetune: bool = False):
    """The task class registered under `name` (with `finetune`, only tasks `imagen finetune` trains)."""
    if name not in (FINETUNE_TASKS if finetune else TASKS):
        hint = "; use `imagen pretrain` for pretraining" if name == "pretrain" else ""
        raise UnknownTaskError(f"unknown task {name!r}; available tasks: {', '.join(FINETUNE_TASKS)}{hint}")
    entry = TASKS[name]
    if isinstance(entry, str):
        module, cls = entry.split(":")
        entry = TASKS[name] = getattr(importlib.import_module(module), cls)
    return entry
