"""Self-supervised multimodal pretraining as a task: MLM, MIM, ITC and ITM through PretrainingModel.

A pretraining run has no head to predict with; it is scored by a linear probe on its frozen pooled image
embedding (logistic regression on labelled training images), the "before fine-tuning" row of a classify
run's before/after table.
"""

from __future__ import annotations

import dataclasses

import torch

from imagen.config import PretrainConfig
from imagen.data.images import normalize_images
from imagen.data.splits import TensorSplit
from imagen.errors import DataError
from imagen.eval.classification import linear_probe
from imagen.models.pretraining import PretrainingModel
from imagen.tasks.base import Task
from imagen.tasks.classify import (SHAPES_DEFAULT_LABEL, RecipeChoices, classification_score, fit_image_model, is_shapes,
                                   labelled_split, recipe_epochs)

# Labelled training images the linear probe is fit on, at most.
PROBE_TRAIN_SIZE = 5000
# The recipe for real images (PretrainTask.fit_recipe), measured with 1 % of Fashion-MNIST's labels
# (bench/label_efficiency.py, bench/RESULTS.md "Label efficiency"): the classify recipe's model, MAE-style masked image
# modelling with a one-block decoder, and about 2,600 steps of 256 images (20 minutes on two CPU cores).
PRETRAIN_OPTIONS = {"lr": 1e-3, "batch_size": 256, "weight_decay": 0.05}
MAE_OPTIONS = {"mim_decoder_layers": 1, "mim_mask_ratio": 0.75, "mim_blank_pixels": True}  # image-only pretraining
PRETRAIN_IMAGES_SEEN = 660_000  # 12 epochs of Fashion-MNIST's 55,000
# The tokenizer's [MASK] id when a run has no tokenizer (image-only): Tokenizer's special tokens come first.
DEFAULT_MASK_ID = 4


class PretrainTask(Task):
    """Wraps PretrainingModel for the trainer; validation reports each objective and in-batch retrieval."""

    name = "pretrain"
    monitor = ("loss", "min")
    Config = PretrainConfig
    headline = ("accuracy", "macro_f1")  # of the linear probe
    predict_inputs = None  # nothing to predict with: fine-tune it first
    recipe = {}  # TrainConfig's defaults on Shapes; other data gets the recipe `fit_recipe` fits to it

    @classmethod
    def fit_recipe(cls, dataset, spec, given, from_run=False):
        """Real images: the classify recipe's model and resolution (so a fine-tuning run started from this one gets
        the model it would have had from scratch), AdamW at PRETRAIN_OPTIONS, about PRETRAIN_IMAGES_SEEN images seen,
        and, for image-only pretraining, MAE-style masked image modelling (MAE_OPTIONS). Shapes keeps the measured
        defaults; a run started from another keeps its model."""
        if is_shapes(spec):
            return {}, []
        recipe = RecipeChoices(given)
        if not from_run:
            fit_image_model(dataset, recipe)
        for name, value in PRETRAIN_OPTIONS.items():
            recipe.choose(name, value)
        if given.get("image_only") or not dataset.has_text:
            mae = {name: recipe.choose(name, value) for name, value in MAE_OPTIONS.items()}
            if mae["mim_decoder_layers"]:
                recipe.notes.append(f"image-only pretraining: MAE-style masked image modelling, {mae['mim_mask_ratio']:.0%} "
                                    f"of the patches masked, a {mae['mim_decoder_layers']}-block decoder (--set "
                                    "pretrain.mim_decoder_layers=0 for SimMIM's linear head)")
        if not {"epochs", "max_steps"} & set(given):
            n = len(dataset)
            epochs, _ = recipe_epochs(n, PRETRAIN_IMAGES_SEEN)
            recipe.choose("epochs", epochs, f"{n} training images: {epochs} epochs (--epochs or --max-steps to change)")
        return recipe.fitted, recipe.notes

    @property
    def find_unused_parameters(self) -> bool:
        """With every objective on, each step uses every parameter; image-only pretraining or a disabled objective
        leaves some idle, and so does MAE-style MIM (the encoder's mask token)."""
        c = self.cfg
        return (c.image_only or min(c.mlm_weight, c.mim_weight, c.itc_weight, c.itm_weight) == 0
                or c.mim_decoder_layers > 0)

    # -- data -----------------------------------------------------------------------------------------

    @classmethod
    def settle(cls, cfg, dataset):
        # Data without captions can only be pretrained on its images.
        return dataclasses.replace(cfg, image_only=cfg.image_only or not dataset.has_text)

    @classmethod
    def uses_tokenizer(cls, cfg):
        return not cfg.image_only

    @classmethod
    def decode(cls, dataset, image_size):
        texts = dataset.texts() if dataset.has_text else [None] * len(dataset)
        return dataset.fast_images(image_size), [{"text": t} for t in texts]

    @classmethod
    def tokenizer_texts(cls, meta, cfg):
        return [m["text"] or "" for m in meta]

    def build_split(self, images, meta, train):
        if self.cfg.image_only or self.tokenizer is None:
            return TensorSplit(images)
        texts = [m["text"] or "" for m in meta]
        input_ids, attention_mask = self.tokenizer.encode(texts, max_length=self.rc.model.max_text_len, pad_to_max=True)
        return TensorSplit(images, input_ids, attention_mask, texts=texts)

    @classmethod
    def build_model(cls, rc, tokenizer=None):
        mask_id = tokenizer.mask_id if tokenizer is not None else DEFAULT_MASK_ID
        return PretrainingModel(rc.model, cls.config_from(rc.task_config), mask_id=mask_id)

    # -- the trainer's contract -----------------------------------------------------------------------

    @staticmethod
    def _inputs(batch):
        return normalize_images(batch["images"]), batch.get("input_ids"), batch.get("attention_mask")

    def training_step(self, model, batch):
        images, input_ids, attention_mask = self._inputs(batch)
        return model(images, input_ids, attention_mask)

    @torch.no_grad()
    def validation_step(self, model, batch):
        images, input_ids, attention_mask = self._inputs(batch)
        out = {k: v.detach().float() for k, v in model(images, input_ids, attention_mask).items()}
        if input_ids is not None and not model.pretrain.image_only and images.shape[0] > 1:
            logits = model.contrastive_logits(images, input_ids, attention_mask)
            same_text = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1)
            hit = same_text[torch.arange(len(logits)), logits.argmax(1)]  # a retrieved duplicate caption counts
            out["itc_r1"] = hit.float().mean()
        return out

    def compute_metrics(self, outputs):
        keys = outputs[0].keys() if outputs else []
        return {k: float(torch.stack([o[k] for o in outputs]).mean()) for k in keys}

    # -- finished runs --------------------------------------------------------------------------------

    def evaluate_run(self, model, data, report_dir=None, echo=print):
        """A linear probe on the frozen encoder, fit on labelled training images, scored on `data`."""
        if data.label is None and is_shapes(data.spec):
            data = dataclasses.replace(data, label=SHAPES_DEFAULT_LABEL)
        names = data.class_names or data.load("train").class_names
        if not names:
            raise DataError(f"data {data.spec!r} has no labels; evaluation of a pretrain run needs labelled data")
        size = self.rc.model.image_size
        test = labelled_split(data, data.split, size, names)
        train = labelled_split(data, "train", size, names)
        k = min(len(train), PROBE_TRAIN_SIZE)
        preds = linear_probe(model.encoder, train.images[:k], train.labels[:k].numpy(), test.images, len(names), data.seed)
        return classification_score(test.labels.numpy(), preds, names, "linear-probe", data, report_dir, echo)
