"""Text-to-image diffusion as a task: the stage's training split and loss (`task`), the cascade's run directory
(`cascade_run`), training the cascade (`training`, what `imagen train-t2i` does) and distilling it (`distill`,
what `imagen distill` does; `progressive` with --steps)."""

from imagen.tasks.text_to_image.cascade_run import (STAGE_TASK, TASK, load_stage, read_finished_t2i_config, read_t2i_config,
                                                    text_encoder_for)
from imagen.tasks.text_to_image.distill import GuidanceDistillationTask, distill_t2i, student_stage
from imagen.tasks.text_to_image.progressive import ProgressiveDistillationTask, progressive_distill_t2i
from imagen.tasks.text_to_image.task import T2ISplit, TextToImageTask
from imagen.tasks.text_to_image.training import (
    STAGE_TRAIN_DEFAULTS,
    default_stages,
    stage_train_config,
    train_t2i,
)

__all__ = [
    "TASK", "STAGE_TASK", "read_finished_t2i_config", "read_t2i_config", "text_encoder_for", "load_stage", "T2ISplit", "TextToImageTask",
    "STAGE_TRAIN_DEFAULTS", "default_stages", "stage_train_config", "train_t2i",
    "GuidanceDistillationTask", "distill_t2i", "student_stage", "ProgressiveDistillationTask", "progressive_distill_t2i",
]
