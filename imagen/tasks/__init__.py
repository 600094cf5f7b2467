"""Tasks: each file holds one task's model builder, loss wiring and metrics; the registry names them."""

from imagen.tasks.registry import TASKS, get_task

__all__ = ["TASKS", "get_task"]
