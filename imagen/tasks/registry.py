"""The task registry: name -> task class. Later tasks register here too."""

from __future__ import annotations

from imagen.errors import UnknownTaskError
from imagen.tasks.caption import CaptionTask
from imagen.tasks.classify import ClassifyTask
from imagen.tasks.detect import DetectTask
from imagen.tasks.instruct import InstructTask
from imagen.tasks.pretrain import PretrainTask
from imagen.tasks.retrieval import RetrievalTask
from imagen.tasks.vqa import VQATask

TASKS = {
    "pretrain": PretrainTask,
    "classify": ClassifyTask,
    "vqa": VQATask,
    "retrieval": RetrievalTask,
    "caption": CaptionTask,
    "detect": DetectTask,
    "instruct": InstructTask,
}

# Names a user may pass to `imagen finetune --task`.
FINETUNE_TASKS = tuple(name for name in TASKS if name != "pretrain")




def get_task(name: str):
    """The task class registered under `name`."""
    if name not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; available tasks: {', '.join(FINETUNE_TASKS)}")
    return TASKS[name]
