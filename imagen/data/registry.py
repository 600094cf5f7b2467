"""load_dataset: one entry point from a `--data` spec (built-in name or path) to an ImageTextDataset."""

from __future__ import annotations

from pathlib import Path

from . import emoji as emoji_mod
from . import fashion_mnist as fm
from .dataset import ImageTextDataset
from imagen.errors import DataError
from .files import SPLITS, load_files, split_indices
from .shapes import LABEL_KINDS, SCENE_MIXES, ShapesWorld, class_names, scene_mix

BUILTINS = ("shapes", "fashion-mnist", "emoji")
SHAPES_DEFAULT_N = {"train": 4000, "val": 500, "test": 1000}
EMOJI_DEFAULT_SIZE = 64


class _ShapesFetch:
    """Picklable index -> sample function (closures would not survive spawned DataLoader workers)."""

    def __init__(self, world: ShapesWorld, label: str | None):
        self.world, self.label = world, label

    def __call__(self, i: int) -> dict:
        s = self.world.sample(i)
        s["label"] = s["labels"][self.label] if self.label else None
        return s


def _shapes(split: str, seed: int, label: str | None, n: int | None, size: int | None, lang: str,
            mix: str | None) -> ImageTextDataset:
    if label is not None and label not in LABEL_KINDS:
        raise DataError(f"unknown label {label!r} for shapes; choose one of: {', '.join(LABEL_KINDS)}")
    mix = "uniform" if mix is None else mix  # "shapes:" names an empty mix: refused below, not taken as uniform
    shares = scene_mix(mix, spec=f"shapes:{mix}")
    if n is None:
        count = SHAPES_DEFAULT_N[split]
    else:
        count = {"train": n, "val": max(1, n // 8), "test": max(1, n // 4)}[split]
    # A single object makes shape/colour labels unambiguous; counting needs 1-3 objects.
    max_objects = 1 if label in ("shape", "color", "color-shape") else 3
    if max_objects == 1 and shares is not None:
        raise DataError(f"the {label!r} label needs one object per image; the {mix!r} scene mix draws several: "
                        "use plain 'shapes'")
    # Each split draws from its own seed stream so train/val/test never share images.
    world = ShapesWorld(seed=seed * 3 + SPLITS.index(split), size=size or 32, lang=lang, max_objects=max_objects,
                        mix=mix)
    return ImageTextDataset.from_function(
        _ShapesFetch(world, label), count, name="shapes", split=split, class_names=class_names(label) if label else None,
        image_size=world.size, has_text=True, has_labels=label is not None, caption_fn=world.captions)


def _fashion_mnist(split: str, label: str | None, n: int | None, size: int | None) -> ImageTextDataset:
    if label not in (None, "class"):
        raise DataError(f"unknown label {label!r} for fashion-mnist; its only label is 'class' (the default)")
    images, targets = fm.load_arrays("t10k" if split == "test" else "train")
    if split == "train":
        images, targets = images[:55000], targets[:55000]
    elif split == "val":
        images, targets = images[55000:], targets[55000:]
    if n is not None:
        images, targets = images[:n], targets[:n]
    names = [fm.CLASS_NAMES[t] for t in targets]
    return ImageTextDataset.from_array(
        images, texts=[fm.caption(c) for c in names], labels=names, name="fashion-mnist", split=split,
        class_names=list(fm.CLASS_NAMES), has_text=True, has_labels=True, resize=size)


def _emoji(split: str, seed: int, label: str | None, n: int | None, size: int | None) -> ImageTextDataset:
    if label is not None:
        raise DataError(f"emoji has no labels (got label={label!r}); use its captions, or pass no label")
    size = size or EMOJI_DEFAULT_SIZE
    images, codepoints, names = emoji_mod.load_emoji(size)
    idx = split_indices(len(images), seed)[split]
    if n is not None:
        idx = idx[:n]
    return ImageTextDataset.from_array(
        images[idx], texts=[names[i] for i in idx], labels=[None] * len(idx),
        ids=[f"U+{codepoints[i]:04X}" for i in idx], name="emoji", split=split,
        class_names=None, has_text=True, has_labels=False)


def _split_variant(spec) -> tuple[str, str | None]:
    """"NAME:VARIANT" -> (NAME, VARIANT) when NAME is a built-in's; anything else is (spec, None)."""
    name, sep, variant = str(spec).partition(":")
    if sep and _normal_key(name) in BUILTINS:
        return name, variant.lower()
    return str(spec), None


def _normal_key(name: str) -> str:
    key = name.lower().replace("_", "-")
    return "fashion-mnist" if key == "fashionmnist" else key


def builtin_key(spec) -> str | None:
    """The built-in dataset a spec names ("Fashion_MNIST" -> "fashion-mnist", "shapes:compositional" ->
    "shapes"), or None for a path."""
    key = _normal_key(_split_variant(spec)[0])
    return key if key in BUILTINS else None


def builtin_variant(spec) -> str | None:
    """The variant a built-in spec names after a colon ("shapes:compositional" -> "compositional"), else None."""
    return _split_variant(spec)[1] if builtin_key(spec) else None


def is_builtin(spec) -> bool:
    return builtin_key(spec) is not None


def recorded_spec(spec) -> str:
    """The data as a run records it: a built-in name, or an absolute path (so the run works from any folder)."""
    return str(spec) if is_builtin(spec) else str(Path(spec).resolve())


def load_dataset(spec: str, split: str = "train", *, seed: int = 0, label: str | None = None,
                 n: int | None = None, size: int | None = None, lang: str = "en",
                 on_bad_sample: str = "skip") -> ImageTextDataset:
    """Load one split of a built-in dataset (shapes, fashion-mnist, emoji) or of user data at a path."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if n is not None and n < 1:
        raise DataError(f"n must be at least 1, got {n}")
    if size is not None and size < 1:
        raise DataError(f"image size must be positive, got {size}")
    spec = str(spec)
    key, variant = builtin_key(spec), builtin_variant(spec)
    if variant is not None and key != "shapes":
        raise DataError(f"{spec!r}: only shapes has variants (shapes:{', shapes:'.join(SCENE_MIXES)}); "
                        f"use plain {key!r}")
    if key == "shapes":
        return _shapes(split, seed, label, n, size, lang, variant)
    if key == "fashion-mnist":
        return _fashion_mnist(split, label, n, size)
    if key == "emoji":
        return _emoji(split, seed, label, n, size)
    if "/" not in spec and "." not in spec and "\\" not in spec:
        if not Path(spec).exists():  # looks like a misspelt built-in name rather than a path
            raise DataError(f"unknown dataset {spec!r}; use a built-in name ({', '.join(BUILTINS)}) "
                            "or a path to a folder or .jsonl/.csv file")
    return load_files(spec, split, seed=seed, label=label, n=n, size=size, on_bad_sample=on_bad_sample)
