"""Image classification: a linear head on the pooled embedding, cross-entropy, accuracy and macro-F1.

The classes are the training data's own (class folders, a `label` field, Fashion-MNIST's ten) or, on the
Shapes world, one label kind chosen with `--label` (shape, color, color-shape, count).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score

from imagen.config import ConfigError
from imagen.data.augment import AUGMENTATIONS, augment
from imagen.data.images import normalize_images
from imagen.data.shapes import LABEL_KINDS as SHAPES_LABEL_KINDS
from imagen.data.splits import TensorSplit
from imagen.errors import DataError, RunError
from imagen.eval.classification import classification_metrics, predict_logits, save_confusion_matrix, text_report
from imagen.models.heads import EncoderForClassification
from imagen.tasks.base import EvalData, RunScore, Task

SHAPES_DEFAULT_LABEL = "color-shape"

# The recipe for real images (ClassifyTask.fit_recipe); each value measured on Fashion-MNIST, bench/RESULTS.md.
MAX_AUTO_IMAGE_SIZE = 64  # larger pictures are downscaled to this unless --image-size says otherwise
PATCH_GRID = 8  # about 8 x 8 patches
TARGET_IMAGES_SEEN = 550_000  # 10 epochs of Fashion-MNIST
MIN_EPOCHS, MAX_EPOCHS = 5, 100
RECIPE_MODEL = {"preset": "mini", "stem_layers": 4, "stem_channels": 64, "qk_norm": True}
RECIPE_OPTIONS = {"lr": 2e-3, "batch_size": 128, "augment": "shift", "label_smoothing": 0.1}
INIT_LAYER_DECAY = 0.65  # fine-tuning a run started --init-from another (MAE's value; best of 0.4-1.0 measured)



def recipe_epochs(num_images: int, images_seen: int = TARGET_IMAGES_SEEN) -> tuple[int, int]:
    """The recipe's schedule for `num_images` training images: (epochs, early-stopping patience), about
    `images_seen` images seen within [MIN_EPOCHS, MAX_EPOCHS] epochs, patience a fifth of them (at least 3)."""
    epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, round(images_seen / max(1, num_images))))
    return epochs, max(3, epochs // 5)


class RecipeChoices:
    """What a recipe fits to the data: `choose` keeps the user's value when `given` has it, else records the
    recipe's (and the line that says why); `fitted` and `notes` are what a task's fit_recipe returns."""

    def __init__(self, given):
        self.given, self.fitted, self.notes = given, {}, []

    def choose(self, name, value, why=None):
        if name in self.given:
            return self.given[name]
        self.fitted[name] = value
        if why:
            self.notes.append(why)
        return value


def fit_image_model(dataset, recipe: RecipeChoices) -> None:
    """The model for real images, shared by the classify and pretrain recipes: the data's own image size up to
    MAX_AUTO_IMAGE_SIZE (or the user's --image-size), the patch that gives about PATCH_GRID x PATCH_GRID patches,
    and RECIPE_MODEL."""
    if "image_size" in recipe.given:  # the patch that divides it into the grid nearest PATCH_GRID x PATCH_GRID
        size = recipe.given["image_size"]
        recipe.choose("patch_size", min((p for p in range(1, size + 1) if size % p == 0),
                                        key=lambda p: abs(size / p - PATCH_GRID)))
    else:
        size = min(dataset.image_size, MAX_AUTO_IMAGE_SIZE)
        patch = recipe.choose("patch_size", max(2, round(size / PATCH_GRID)))
        size = max(patch, size - size % patch)
        recipe.choose("image_size", size, f"images are {dataset.image_size} px: training at {size} px with {patch} px "
                                          f"patches ({size // patch} x {size // patch}); --image-size to change")
    for name, value in RECIPE_MODEL.items():
        recipe.choose(name, value)


@dataclass
class ClassifyConfig:
    """Classification head options."""

    label: str | None = None  # Shapes label kind: shape, color, color-shape, count (None: color-shape on Shapes)
    label_smoothing: float = 0.0
    augment: str = "none"  # none | shift | shift-flip (training batches only)
    # mean: average of the patch states (timm's global_pool="avg"); cls: the image [CLS] state. On Fashion-MNIST
    # a tiny encoder reached 70.4 % val accuracy after 250 steps with mean pooling, 65.9 % with [CLS].
    pooling: str = "mean"

    def __post_init__(self):
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"unknown augmentation {self.augment!r}; choose one of: {', '.join(AUGMENTATIONS)}")
        if self.pooling not in ("mean", "cls"):
            raise ConfigError(f"unknown pooling {self.pooling!r}; choose mean or cls")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")


def is_shapes(spec) -> bool:
    return str(spec).lower() == "shapes"


def label_ids(labels, class_names: list[str], where: str) -> torch.Tensor:
    """Class indices of string labels; a label outside the run's classes is a DataError naming it."""
    index = {name: i for i, name in enumerate(class_names)}
    missing = sorted({str(label) for label in labels if label not in index})
    if missing:
        raise DataError(f"{where}: labels {missing[:5]} are not among the run's {len(class_names)} classes "
                        f"({', '.join(map(str, class_names[:10]))}); evaluate on data with the same label set")
    return torch.tensor([index[label] for label in labels], dtype=torch.long)


def labelled_split(data: EvalData, split: str, image_size: int, class_names: list[str]) -> TensorSplit:
    """One split of `data` as uint8 images and class ids over `class_names`."""
    ds = data.load(split)
    if not ds.has_labels:
        raise DataError(f"data {data.spec!r} ({split}) has no labels to evaluate against")
    return TensorSplit(ds.fast_images(image_size), labels=label_ids(ds.labels(), class_names, f"data {data.spec!r} ({split})"))


def classification_score(targets: np.ndarray, preds: np.ndarray, class_names: list[str], method: str, data: EvalData,
                         report_dir: Path | None, echo) -> RunScore:
    """Accuracy and macro-F1; with `report_dir`, scikit-learn's report echoed and the confusion matrix as a PNG."""
    if report_dir is not None:
        name = f"{Path(str(data.spec)).name}-{data.split}"
        png = save_confusion_matrix(targets, preds, class_names, Path(report_dir) / f"{name}-confusion.png",
                                    title=f"{Path(report_dir).parent.name} on {data.spec} ({data.split})")
        echo(text_report(targets, preds, class_names))
        echo(f"confusion matrix: {png}")
    return RunScore(classification_metrics(targets, preds, len(class_names)), len(targets), method)


class ClassifyTask(Task):
    """Trains EncoderForClassification; metrics are accuracy and macro-F1 (scikit-learn)."""

    name = "classify"
    monitor = ("accuracy", "max")
    Config = ClassifyConfig
    headline = ("accuracy", "macro_f1")
    needs_tokenizer = False
    comparable_with = ("pretrain",)  # a pretraining run scores on the same labels through a linear probe
    recipe = {"epochs": 3}  # on Shapes; other data gets the recipe `fit_recipe` fits to it
    search_space = {**Task.search_space, "label_smoothing": {"low": 0.0, "high": 0.2}}

    @classmethod
    def fit_recipe(cls, dataset, spec, given, from_run=False):
        """Real images: a model, resolution and schedule fitted to the data (Shapes keeps `recipe`, measured there).

        The image size is the data's own up to MAX_AUTO_IMAGE_SIZE, the patch grid about 8 x 8 behind a four-layer
        convolutional stem, and the schedule a number of images seen (TARGET_IMAGES_SEEN) spread over between
        MIN_EPOCHS and MAX_EPOCHS epochs, so 1,000 images get many epochs and 50,000 a few; the best validated weights
        are kept and patience stops a run that no longer improves. A run started from another (`from_run`) keeps its
        model and resolution and gets the same schedule with layer-wise lr decay.
        Figures: bench/RESULTS.md ("Encoder on real images", "Label efficiency")."""
        if is_shapes(spec):
            return {}, []
        recipe = RecipeChoices(given)
        if not from_run:  # from scratch: the recipe's model; otherwise it is the run's this one starts from
            fit_image_model(dataset, recipe)
        else:  # layer-wise lr decay keeps the pretrained lower layers close to where they were (BEiT, MAE)
            recipe.choose("layer_decay", INIT_LAYER_DECAY)
        for name, value in RECIPE_OPTIONS.items():
            recipe.choose(name, value)
        n = len(dataset)
        if not {"epochs", "max_steps"} & set(given):
            epochs, patience = recipe_epochs(n)
            recipe.choose("epochs", epochs, f"{n} training images: {epochs} epochs (--epochs to change), keeping the "
                                            "best validated weights")
            recipe.choose("early_stopping_patience", patience)
        return recipe.fitted, recipe.notes

    # -- data -----------------------------------------------------------------------------------------

    @classmethod
    def data_label(cls, cfg, spec):
        return cfg.label if cfg.label is not None or not is_shapes(spec) else SHAPES_DEFAULT_LABEL

    @classmethod
    def check_data(cls, dataset, spec):
        if not dataset.has_labels or not dataset.class_names:
            raise DataError(f"data {spec!r} has no labels to classify; give a labelled dataset (class folders or a 'label' "
                            f"field) or name its label field with --label (a folder from `imagen data shapes`: --label "
                            f"{', '.join(SHAPES_LABEL_KINDS)})")
        if len(dataset.class_names) < 2:
            raise DataError(f"data {spec!r} has one class only ({dataset.class_names[0]!r}); classification needs at "
                            "least two, e.g. one class folder per label")
        unlabelled = sum(label is None for label in dataset.labels())
        if unlabelled:
            raise DataError(f"{unlabelled} of the {len(dataset)} training samples of {spec!r} have no label; give every "
                            "row a label (or remove those rows)")

    @classmethod
    def decode(cls, dataset, image_size):
        # Only the labels are needed: no per-sample decoding beyond the (vectorised) images.
        return dataset.fast_images(image_size), [{"label": label} for label in dataset.labels()]

    @classmethod
    def vocabulary(cls, meta, cfg, dataset=None):
        return list(dataset.class_names) if dataset is not None else sorted({m["label"] for m in meta})

    def build_split(self, images, meta, train):
        return TensorSplit(images, labels=label_ids([m["label"] for m in meta], self.rc.class_names, "training data"))

    @classmethod
    def build_model(cls, rc, tokenizer=None):
        c = cls.config_from(rc.task_config)
        return EncoderForClassification(rc.model, len(rc.class_names or []), c.label_smoothing, rc.model.dropout, c.pooling)

    # -- the trainer's contract -----------------------------------------------------------------------

    def training_step(self, model, batch):
        images = augment(batch["images"], self.cfg.augment)
        out = model(images=normalize_images(images), labels=batch["labels"])
        acc = (out.logits.argmax(-1) == batch["labels"]).float().mean()
        return {"loss": out.loss, "acc": acc.detach()}

    @torch.no_grad()
    def validation_step(self, model, batch):
        out = model(images=normalize_images(batch["images"]), labels=batch["labels"])
        return {"loss": out.loss.detach().float().expand(len(batch["labels"])), "probs": out.logits.float().softmax(-1), "targets": batch["labels"]}

    def compute_metrics(self, outputs):
        probs = torch.cat([o["probs"] for o in outputs]).cpu().numpy()
        targets = torch.cat([o["targets"] for o in outputs]).cpu().numpy()
        preds = probs.argmax(1)
        return {
            "loss": float(torch.cat([o["loss"] for o in outputs]).mean()),
            "accuracy": float((preds == targets).mean()),
            "macro_f1": float(f1_score(targets, preds, average="macro", labels=np.arange(probs.shape[1]), zero_division=0)),
        }

    # -- finished runs --------------------------------------------------------------------------------

    def evaluate_run(self, model, data, report_dir=None, echo=print):
        names = data.class_names or self.rc.class_names
        if list(self.rc.class_names) != list(names):
            raise RunError(f"a classify run trained on other classes ({len(self.rc.class_names)}) than these ({len(names)}) cannot be compared")
        test = labelled_split(data, data.split, self.rc.model.image_size, names)
        preds = predict_logits(model, test.images).argmax(1).numpy()
        return classification_score(test.labels.numpy(), preds, names, "head", data, report_dir, echo)

    @torch.no_grad()
    def predict(self, model, images, files, top_k=1, **_):
        probs = model(images=normalize_images(images)).logits.float().softmax(-1)
        names = self.rc.class_names
        results = []
        for f, p in zip(files, probs):
            top = p.topk(min(top_k, len(p)))
            results.append({
                "file": str(f),
                "label": names[int(top.indices[0])],
                "probability": float(top.values[0]),
                "top": [{"label": names[int(i)], "probability": float(v)} for v, i in zip(top.values, top.indices)],
            })
        return results
