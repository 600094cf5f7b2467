"""The one contract every task speaks (pretraining and classification included), and the defaults most share.

A task class is everything the run commands (`imagen pretrain`, `finetune`, `evaluate`, `predict`) need to know
about one task; they name no task themselves. Through it a task
- fixes what it reads from the data: `data_label` (the label kind to load), `check_data`, `settle` (options the
  data decides), `decode` (a split decoded once into uint8 images and per-sample fields), `vocabulary` (classes or
  answers fixed at fine-tuning time) and `tokenizer_texts`;
- builds its examples (`build_split`) and model (`build_model`), and starts from a finished run (`init_from`);
- trains through the task-agnostic trainer (`collate`, `training_step`, `validation_step`, `compute_metrics`);
- scores a finished run (`evaluate_run`) and answers new inputs (`predict`, taking the inputs in `predict_inputs`).
Its options live in a dataclass `Config`, saved in the run's config.json under `task_config`, given to the API
as keyword arguments or on the command line as `--set <task>.<key>=value`. Its default training recipe is `recipe`.
Adding a task means one file under tasks/ (plus its head under models/) and one line in tasks/registry.py.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from imagen.config import ConfigError, from_dict
from imagen.data import load_dataset
from imagen.data.examples import collect

log = logging.getLogger("imagen")


@dataclasses.dataclass
class NoOptions:
    """A task without options."""


@dataclass
class EvalData:
    """Where a finished run is scored: a data spec, its split and how to read it; `class_names` are the classes
    of the run being scored, so runs compared with it are scored on the same labels."""

    spec: str
    split: str = "test"
    seed: int = 0
    label: str | None = None
    n: int | None = None
    on_bad_sample: str = "skip"
    class_names: list[str] | None = None

    def load(self, split: str | None = None):
        return load_dataset(self.spec, split or self.split, seed=self.seed, label=self.label, n=self.n,
                            on_bad_sample=self.on_bad_sample)


@dataclass
class RunScore:
    """A finished run's metrics on one split, how many examples they cover, and how they were obtained."""

    metrics: dict[str, float | None]
    n: int
    method: str | None = None  # e.g. "head" or "linear-probe" where a task can score a run more than one way


class Task:
    name = "task"
    monitor = ("loss", "min")
    Config: type = NoOptions
    # Metrics shown in before/after tables, first = the headline.
    headline: tuple[str, ...] = ("loss",)
    needs_tokenizer = True
    # Extra inputs `predict` understands besides image files and top_k (e.g. "question"); None: cannot predict.
    predict_inputs: tuple[str, ...] | None = ()
    # Other tasks whose runs score on this task's metrics, so they may sit in its before/after table.
    comparable_with: tuple[str, ...] = ()
    # The task's default recipe: TrainConfig fields that differ from TrainConfig's defaults, plus "shapes_n", the
    # training images drawn from the built-in Shapes world when the user gives no --n (the world is procedural,
    # so more data costs only decoding time). The user's options override every one of them.
    recipe: dict[str, Any] = {"epochs": 3}
    # What `imagen tune` searches unless `--space` says otherwise: option name -> a list of choices, or a range
    # {"low", "high", "log"} (integers when both ends are). Centred on the recipe; the user's --space replaces it.
    search_space: dict[str, Any] = {
        "lr": {"low": 1e-4, "high": 5e-3, "log": True},
        "weight_decay": {"low": 0.0, "high": 0.1},
        "batch_size": [32, 64, 128],
        "warmup_steps": {"low": 0, "high": 100},
        "dropout": {"low": 0.0, "high": 0.2},
    }
    # DistributedDataParallel must look for parameters that get no gradient in a step (heads or inputs a batch does
    # not use: an image-only task leaves the text embeddings idle). A task that uses every parameter may say False.
    find_unused_parameters = True

    @classmethod
    def fit_recipe(cls, dataset, spec, given: dict[str, Any], from_run: bool = False) -> tuple[dict[str, Any], list[str]]:
        """The defaults this task's recipe picks for the training data `dataset` (of `spec`): option name -> value
        (TrainConfig, EncoderConfig or task option names, or "preset"), and lines that say what was chosen and why.
        `given` holds the options the user set (name -> value); they are never chosen. `from_run` is True when
        the run starts from another (--init-from), whose architecture is then not the recipe's to choose. By default
        nothing depends on the data."""
        return {}, []

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
    def options(cls) -> set[str]:
        """Names of the task's options (fields of its Config)."""
        return {f.name for f in dataclasses.fields(cls.Config)}

    # -- what the task reads from the data ------------------------------------------------------------

    @classmethod
    def data_label(cls, cfg, spec: str) -> str | None:
        """The label kind to load the data with (Shapes: shape, color, ...), or None for the data's own."""
        return None

    @classmethod
    def check_data(cls, dataset, spec: str) -> None:
        """Raise DataError when the training data cannot serve this task (e.g. no labels to classify)."""

    @classmethod
    def settle(cls, cfg, dataset):
        """The options, with those that the training data decides filled in (default: unchanged)."""
        return cfg

    @classmethod
    def uses_tokenizer(cls, cfg) -> bool:
        return cls.needs_tokenizer

    @classmethod
    def decode(cls, dataset, image_size: int) -> tuple[torch.Tensor, list[dict]]:
        """A split decoded once: uint8 images (N, 3, S, S) and each sample's fields except the image."""
        return collect(dataset, image_size)

    @classmethod
    def vocabulary(cls, meta: list[dict], cfg, dataset=None) -> list[str] | None:
        """Output vocabulary fixed at fine-tuning time from the training metadata (answers, classes) or the
        training `dataset` itself, or None."""
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
        model.encoder.load_encoder_weights(init.model.encoder.state_dict())
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

    def evaluate_run(self, model, data: EvalData, report_dir=None, echo=print) -> RunScore:
        """Score a finished run's model on `data`; `report_dir`, when given, receives the task's report files."""
        images, meta = self.decode(data.load(), self.rc.model.image_size)
        split = self.build_split(images, meta, train=False)
        return RunScore(self.evaluate(model, split), len(split))

    def predict(self, model, images: torch.Tensor, files: list[str], **inputs) -> list[dict[str, Any]]:
        """One answer per image; `files` label the answers, `inputs` hold top_k, the task's predict_inputs and
        `sizes`, each picture's own (width, height) before it was resized to the model's size."""
        raise NotImplementedError


def require_tokenizer(tokenizer, task: str):
    if tokenizer is None:
        raise ConfigError(f"the {task} task needs a tokenizer; start from a pretraining run with captions or train one")
    return tokenizer
