"""The errors a user can cause; the CLI prints each as one line and exits non-zero."""

from imagen.config import ConfigError
from imagen.data.errors import DataError
from imagen.eval.evaluator import EvalError
from imagen.generation import GenerationError
from imagen.models.text_encoders import TextEncoderError
from imagen.runs import RunError
from imagen.tasks.registry import UnknownTaskError
from imagen.train.checkpoint import CheckpointError

USER_ERRORS = (ConfigError, DataError, RunError, UnknownTaskError, CheckpointError, GenerationError, TextEncoderError, EvalError)
