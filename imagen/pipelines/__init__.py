"""Inference compositions: the text-to-image cascade + its text encoder + a sampler (`TextToImagePipeline`), driven
by one `SamplingConfig`; generating to files and evaluating a run."""

from imagen.diffusion import SamplingConfig
from imagen.pipelines.evaluate import evaluate_t2i
from imagen.pipelines.text_to_image import TextToImagePipeline, generate_to_files, read_prompts

__all__ = ["SamplingConfig", "TextToImagePipeline", "generate_to_files", "read_prompts", "evaluate_t2i"]
