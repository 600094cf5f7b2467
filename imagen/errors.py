"""Every error a user can cause, in one module that imports nothing else of the toolkit.

Each layer raises these; the CLI prints one as a single line and exits non-zero (`USER_ERRORS`). A new error
type belongs here, so the command line never needs to import a layer just to know its exceptions.
"""


class ConfigError(ValueError):
    """A config key or value a user gave is not valid."""


class DataError(Exception):
    """Data a user pointed at cannot be read or used (missing, unreadable, empty, of the wrong kind)."""


class RunError(ValueError):
    """A run directory is missing, incomplete, damaged, of the wrong kind, or would be overwritten."""


class UnknownTaskError(ValueError):
    """No task is registered under the name a user gave."""


class CheckpointError(RuntimeError):
    """A checkpoint or weights file is missing, damaged or does not fit the model."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss keeps being NaN / inf)."""


class GenerationError(ValueError):
    """A text-to-image request that cannot be served (bad prompt file, unknown sampler, missing stage ...)."""


class TextEncoderError(ValueError):
    """A text encoder cannot be built or loaded (unknown kind, missing weights or tokenizer)."""


class EvalError(ValueError):
    """An evaluation cannot run (e.g. the evaluator network is missing or damaged)."""


class OutputError(OSError):
    """An output path cannot be written: under a file, a folder where a file goes, read-only, or the disk is full."""


USER_ERRORS = (ConfigError, DataError, RunError, UnknownTaskError, CheckpointError, TrainingError, GenerationError,
               TextEncoderError, EvalError, OutputError)
