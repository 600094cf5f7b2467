"""Reader for Fashion-MNIST IDX files shipped by the Debian package dataset-fashion-mnist."""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np

from imagen.errors import DataError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# IDX type codes -> numpy dtypes (big-endian per the format).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def data_dir() -> Path:
    """The Fashion-MNIST folder: $IMAGEN_FASHION_MNIST_DIR or the Debian package location."""
    return Path(os.environ.get("IMAGEN_FASHION_MNIST_DIR", DEFAULT_DIR))


def caption(class_name: str) -> str:
    """The caption used for a Fashion-MNIST class."""
    return f"a photo of a {class_name.lower()}"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse a (optionally gzipped) IDX file into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path} ({exc}); reinstall the Debian package dataset-fashion-mnist") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number); reinstall the Debian package dataset-fashion-mnist")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    count = int(np.prod(dims)) if dims else 0
    if len(raw) - header < count * dtype.itemsize:
        raise DataError(f"IDX file {path} is truncated; reinstall the Debian package dataset-fashion-mnist")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header)
    return data.reshape(dims).astype(dtype.newbyteorder("="), copy=False)


def load_arrays(part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 28, 28) and labels int64 (N,) for part 'train' or 't10k' (read-only, cached)."""
    return _load_arrays(part, str(data_dir()))


@functools.lru_cache(maxsize=4)  # train and val both slice the train file; decompress it once per process
def _load_arrays(part: str, root_str: str) -> tuple[np.ndarray, np.ndarray]:
    root = Path(root_str)
    images_path = root / f"{part}-images-idx3-ubyte.gz"
    labels_path = root / f"{part}-labels-idx1-ubyte.gz"
    for p in (images_path, labels_path):
        if not p.is_file():
            raise DataError(f"Fashion-MNIST not found at {p}; install the Debian package dataset-fashion-mnist "
                            f"(sudo apt-get install dataset-fashion-mnist) or set IMAGEN_FASHION_MNIST_DIR")
    images = read_idx(images_path).astype(np.uint8, copy=False)
    labels = read_idx(labels_path).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST files in {root} disagree ({images.shape} images, {labels.shape} labels); "
                        "reinstall the Debian package dataset-fashion-mnist")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise DataError(f"Fashion-MNIST labels in {labels_path} are out of range 0..9; reinstall the package")
    images.flags.writeable = False  # shared by every dataset built from this cache
    labels.flags.writeable = False
    return images, labels
