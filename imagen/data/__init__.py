"""Data layer: built-in datasets (Shapes, Fashion-MNIST, Emoji), user files, images, tensor splits and the tokenizer."""

from .dataset import ImageTextDataset
from imagen.errors import DataError
from .images import image_to_tensor, normalize_images, open_image, to_rgb
from .registry import load_dataset
from .shapes import ShapesWorld, write_shapes
from .shapes import class_names as shapes_class_names
from .tokenizer import Tokenizer

__all__ = [
    "DataError", "ImageTextDataset", "ShapesWorld", "Tokenizer", "image_to_tensor", "load_dataset",
    "normalize_images", "open_image", "shapes_class_names", "to_rgb", "write_shapes",
]
