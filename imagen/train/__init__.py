"""Task-agnostic training: the loop, optimiser and schedule, checkpoints, loggers, device and precision."""

from .checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, load_weights, save_checkpoint,
                         save_weights)
from .distributed import (ProcessInfo, barrier, broadcast_object, current_process, from_main, init_distributed,
                          launch_local)
from .distributed import destroy as destroy_processes
from .device import autocast_context, move_to_device, resolve_device, resolve_precision
from .loggers import MetricsLogger
from .optim import build_optimizer, build_scheduler, lr_lambda
from .rng import seed_everything
from .trainer import Trainer, TrainingError, TrainResult

__all__ = [
    "CheckpointError", "MetricsLogger", "ProcessInfo", "barrier", "broadcast_object", "current_process", "destroy_processes", "from_main", "init_distributed", "launch_local", "TrainResult", "Trainer", "TrainingError", "autocast_context",
    "build_optimizer", "build_scheduler", "latest_checkpoint", "load_checkpoint", "load_weights", "lr_lambda",
    "move_to_device", "resolve_device", "resolve_precision", "save_checkpoint", "save_weights", "seed_everything",
]
