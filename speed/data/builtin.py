"""The built-in datasets, held in memory and served by index (no storage, no Ray Data):
``digits`` (scikit-learn's 8x8 digits, ``speed.data.digits``) and ``patches`` (crops of the
photographs the installed packages ship, ``speed.data.patches``).

Importing this module needs neither torch nor the datasets themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

from speed.data.digits import DIGITS_NUM_CLASSES, DIGITS_NUM_IMAGES
from speed.data.patches import PATCHES_NUM_CLASSES, PATCHES_NUM_IMAGES

if TYPE_CHECKING:
    import torch

BUILTIN_FORMATS = ("digits", "patches")
_SIZES = {"digits": (DIGITS_NUM_IMAGES, DIGITS_NUM_CLASSES), "patches": (PATCHES_NUM_IMAGES, PATCHES_NUM_CLASSES)}


def is_builtin(data_format: str) -> bool:
    return data_format in BUILTIN_FORMATS


def builtin_num_images(data_format: str) -> int:
    return _SIZES[data_format][0]


def builtin_num_classes(data_format: str) -> int:
    return _SIZES[data_format][1]


def load_builtin(data_format: str, resolution: int, channels: int) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """(images float32 [N, C, R, R] in [-1, 1], labels int64 [N]) of a built-in dataset."""
    if data_format == "digits":
        from speed.data.digits import load_digits

        return load_digits(resolution, channels)
    if data_format == "patches":
        from speed.data.patches import load_patches

        return load_patches(resolution, channels)
    raise ValueError(f"data.format={data_format!r} is not a built-in dataset; built in: {', '.join(BUILTIN_FORMATS)}")
