"""What a fine-tuning task provides beyond the trainer's contract, and the defaults most tasks share.

A task class turns a dataset split into examples (`build_split`), builds its model (`build_model`), trains it
(`training_step`, `validation_step`, `compute_metrics` for the trainer) and answers new inputs (`predict`).
Its options live in a dataclass `Config`, saved in the run's config.json under `task_config` and set from the
command line as `--set <task>.<key>=value`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from imagen.config import ConfigError, from_dict

log = logging.getLogger("imagen")


@dataclasses.dataclass
class NoOptions:
    """A task without options."""


class Task:
    name = "task"
    monitor = ("loss", "min")
    Config: type = NoOptions
    # Metrics shown in before/after tables, first = the headline.
    headline: tuple[str, ...] = ("loss",)
    needs_tokenizer = True
    # The task's default recipe: TrainConfig fields, plus "shapes_n", the training images drawn from the built-in
    # Shapes world when the user gives no --n (the world is procedural, so more data costs only decoding time).
    # The user's options override every one of them.
    recipe: dict[str, Any] = {"epochs": 3, "lr": 1e-3}

    def __init__(self, run_config, tokenizer=None):
        self.rc = run_config
        self.tokenizer = tokenizer
        self.cfg = self.config_from(getattr(run_config, "task_config", None))

    # -- configuration ---------------------------------------------------------------------------

    @classmethod
    def config_from(cls, data: dict[str, Any] | None):
        try:
            return from_dict(cls.Config, data or {})
        except TypeError as e:
            raise ConfigError(f"{cls.name} options: {e}") from None

    @classmethod
    def vocabulary(cls, meta: list[dict], cfg) -> list[str] | None:
        """Output vocabulary fixed at fine-tuning time from the training metadata (answers, classes), or None."""
        return None

    @classmethod
    def tokenizer_texts(cls, meta: list[dict], cfg) -> list[str]:
        """Texts to train a tokenizer on when the run does not start from a pretraining run."""
        return [m["text"] for m in meta if m.get("text")]

    # -- data and model --------------------------------------------------------------------------

    def build_split(self, images: torch.Tensor, meta: list[dict], train: bool):
        raise NotImplementedError

    @classmethod
    def build_model(cls, rc, tokenizer):
        raise NotImplementedError

    def init_from(self, model, init) -> str:
        """Copy a finished run's weights into a fresh model; by default its encoder only."""
        model.encoder.load_state_dict(init.model.encoder.state_dict())
        return "encoder"

    def encode_texts(self, texts: list[str], what: str, pad_to_max: bool = True):
        """Token ids and mask of model inputs (questions, prompts), warning once about any that get truncated."""
        tok = require_tokenizer(self.tokenizer, self.name)
        limit = self.rc.model.max_text_len
        too_long = sum(len(tok.tokenize(t)) + 2 > limit for t in texts)
        if too_long:
            log.warning("%d %s(s) longer than %d tokens were truncated", too_long, what, limit)
        return tok.encode(texts, max_length=limit, pad_to_max=pad_to_max)

    def collate(self, batch):
        return batch  # ExampleSplit batches arrive collated

    # -- evaluation --------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model, split, batch_size: int = 256) -> dict[str, float]:
        """The task's metrics over a whole split (the model is put in eval mode)."""
        model.eval()
        outputs = [self.validation_step(model, split.__getitems__(list(range(i, min(i + batch_size, len(split))))))
                   for i in range(0, len(split), batch_size)]
        return self.compute_metrics(outputs)

    def predict(self, model, images: torch.Tensor, files: list[str], **inputs) -> list[dict[str, Any]]:
        raise NotImplementedError


def require_tokenizer(tokenizer, task: str):
    if tokenizer is None:
        raise ConfigError(f"the {task} task needs a tokenizer; start from a pretraining run with captions or train one")
    return tokenizer
