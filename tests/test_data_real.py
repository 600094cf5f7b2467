"""Real data shipped by Debian packages: Fashion-MNIST and the Noto emoji set."""

import os

import numpy as np
import pytest

from imagen.data import DataError, load_dataset
from imagen.data import emoji as emoji_mod
from imagen.data import fashion_mnist as fm


def _need_fashion_mnist():
    if not (fm.data_dir() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")


def test_fashion_mnist_splits_and_labels():
    _need_fashion_mnist()
    sizes = {s: len(load_dataset("fashion-mnist", s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 55000, "val": 5000, "test": 10000}
    ds = load_dataset("fashion-mnist", "val")
    assert ds.class_names == fm.CLASS_NAMES and ds.image_size == 28 and ds.has_labels and ds.has_text
    ids = ds.label_ids()
    assert int(ids.min()) == 0 and int(ids.max()) == 9 and len(set(ids.tolist())) == 10
    s = ds[0]
    assert s["image"].mode == "RGB" and s["image"].size == (28, 28)
    assert s["text"] == f"a photo of a {s['label'].lower()}"
    images = ds.fast_images()
    assert images.shape == (5000, 3, 28, 28) and np.array_equal(images[0].permute(1, 2, 0).numpy(), np.asarray(s["image"]))
    assert load_dataset("fashion-mnist", "test", n=7, size=32).fast_images().shape == (7, 3, 32, 32)


def test_fashion_mnist_missing_dir_names_package(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEN_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEN_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_emoji_set(cache):
    if not os.path.isfile(emoji_mod.FONT_PATH):
        pytest.skip("fonts-noto-color-emoji is not installed")
    ds = load_dataset("emoji", "train", size=32)
    assert len(ds) > 500 and ds.class_names is None and not ds.has_labels
    assert (cache / "emoji-32.npz").is_file()
    for i in (0, len(ds) // 2, len(ds) - 1):
        s = ds[i]
        assert s["text"] and s["image"].mode == "RGB" and s["image"].size == (32, 32)
        assert np.asarray(s["image"]).std() > 10  # not blank
    again = load_dataset("emoji", "train", size=32)  # from the cache: same content
    assert again.texts() == ds.texts()
    test = load_dataset("emoji", "test", size=32)
    assert len(test) > 50 and not {s["id"] for s in test} & {s["id"] for s in ds}


def test_emoji_missing_font_names_package(cache, monkeypatch):
    monkeypatch.setenv("IMAGEN_EMOJI_FONT", str(cache / "none.ttf"))
    with pytest.raises(DataError, match="fonts-noto-color-emoji"):
        load_dataset("emoji")
