"""Tasks: each file holds one task's data, head wiring, loss, metrics and recipe; the registry names them."""

from imagen.tasks.registry import FINETUNE_TASKS, TASKS, get_task

__all__ = ["FINETUNE_TASKS", "TASKS", "get_task"]
