"""The second built-in dataset: ``patches``, 10 classes of small RGB crops of natural photographs.

Digits are nearly free to learn; ``patches`` is harder and closer to natural images. Each class
is one region of one of the photographs that the installed packages ship (nothing is downloaded):
scikit-learn's ``china.jpg`` and ``flower.jpg`` and matplotlib's ``grace_hopper.jpg``.

====  ==============  ==========================================
label name            region (x0, y0, x1, y1) of the source image
====  ==============  ==========================================
0     sky             china.jpg, the sky right of the pagoda
1     pagoda          china.jpg, the pagoda's roofs and facade
2     lake            china.jpg, the lake
3     trees           china.jpg, the trees in the foreground
4     petals          flower.jpg, the dahlia
5     leaves          flower.jpg, the dark green background
6     face            grace_hopper.jpg, the face and glasses
7     stars           grace_hopper.jpg, the flag's stars
8     backdrop        grace_hopper.jpg, the blue backdrop
9     uniform         grace_hopper.jpg, the dark uniform
====  ==============  ==========================================

Each image is a square crop of a random side (``CROP_MIN``..``CROP_MAX`` pixels of the source,
never more than the region) at a random position inside its region, horizontally flipped with
probability 1/2, and resized to ``resolution`` with a box filter (``channels`` 1: PIL's grey
conversion). ``PER_CLASS`` images per class (3,000 in all), drawn from one seeded generator:
the same images every time on the same platform (``load_patches``). Classes differ by colour and
texture at several scales, some of them only slightly (sky and backdrop, leaves and uniform).

``load_patches`` gives them in memory like ``load_digits`` (``data.format: patches``);
``write_patches`` writes them as an imagefolder of PNG files (``<uri>/<name>/<index>.png``) to a
local folder or s3:// prefix, for ``data.format=imagefolder`` or any other tool:

    python -m speed.data.patches --out DIR [--resolution 16] [--channels 3]
"""

from __future__ import annotations

import io
import os
from functools import lru_cache
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:  # torch is imported where used
    import torch

    from speed.config.schema import StorageConfig

PATCHES_VERSION = 1  # bump when the regions or the recipe change (the evaluator's cache follows)
PATCHES_SEED = 0
PATCHES_NUM_CLASSES = 10
PER_CLASS = 300
PATCHES_NUM_IMAGES = PATCHES_NUM_CLASSES * PER_CLASS
PATCHES_NATIVE_RESOLUTION = 16
CROP_MIN, CROP_MAX = 24, 64

# (name, source image, region x0, y0, x1, y1 in source pixels)
CLASSES: Tuple[Tuple[str, str, Tuple[int, int, int, int]], ...] = (
    ("sky", "china", (384, 0, 640, 150)),
    ("pagoda", "china", (90, 60, 330, 330)),
    ("lake", "china", (340, 228, 560, 300)),
    ("trees", "china", (360, 300, 640, 427)),
    ("petals", "flower", (180, 90, 440, 350)),
    ("leaves", "flower", (0, 0, 160, 427)),
    ("face", "hopper", (170, 140, 350, 310)),
    ("stars", "hopper", (0, 20, 140, 230)),
    ("backdrop", "hopper", (370, 150, 512, 330)),
    ("uniform", "hopper", (40, 380, 220, 590)),
)
CLASS_NAMES: Tuple[str, ...] = tuple(name for name, _, _ in CLASSES)


def _source_path(name: str) -> str:
    if name in ("china", "flower"):
        import sklearn.datasets

        return os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", f"{name}.jpg")
    if name == "hopper":
        import matplotlib

        return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    raise KeyError(name)


@lru_cache(maxsize=None)
def _source_image(name: str):
    from PIL import Image

    path = _source_path(name)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"data.format=patches needs '{os.path.basename(path)}', which scikit-learn / matplotlib ship; "
            f"it is missing from this installation (reinstall the package that provides it)"
        )
    with Image.open(path) as image:
        return image.convert("RGB").copy()


def _crop_boxes(seed: int) -> List[Tuple[int, Tuple[int, int, int, int], bool]]:
    """(label, crop box in source pixels, flip) of every image, class by class, from one generator."""
    rng = np.random.default_rng(seed)
    out = []
    for label, (_, _, (x0, y0, x1, y1)) in enumerate(CLASSES):
        largest = min(CROP_MAX, x1 - x0, y1 - y0)
        for _ in range(PER_CLASS):
            side = int(rng.integers(min(CROP_MIN, largest), largest + 1))
            left = int(rng.integers(x0, x1 - side + 1))
            top = int(rng.integers(y0, y1 - side + 1))
            out.append((label, (left, top, left + side, top + side), bool(rng.integers(0, 2))))
    return out


@lru_cache(maxsize=4)
def _patches_uint8(resolution: int, channels: int, seed: int = PATCHES_SEED) -> Tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    images, labels = [], []
    for label, box, flip in _crop_boxes(seed):
        crop = _source_image(CLASSES[label][1]).crop(box)
        if flip:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop = crop.resize((resolution, resolution), Image.BOX)
        if channels == 1:
            crop = crop.convert("L")
        array = np.asarray(crop, dtype=np.uint8)
        images.append(array[:, :, None] if array.ndim == 2 else array)
        labels.append(label)
    out = np.stack(images), np.asarray(labels, dtype=np.int64)
    out[0].setflags(write=False)
    out[1].setflags(write=False)
    return out


def _check(resolution: int, channels: int) -> None:
    if resolution <= 0:
        raise ValueError(f"data.resolution={resolution} must be > 0 for the patches dataset")
    if channels not in (1, 3):
        raise ValueError(f"data.channels={channels} is not valid for patches; use 3 (RGB) or 1 (grey)")


def patches_uint8(resolution: int = PATCHES_NATIVE_RESOLUTION, channels: int = 3) -> Tuple[np.ndarray, np.ndarray]:
    """All patches as (uint8 [N, R, R, C], labels int64 [N]), read-only arrays, class by class."""
    _check(resolution, channels)
    return _patches_uint8(int(resolution), int(channels))


def load_patches(resolution: int = PATCHES_NATIVE_RESOLUTION, channels: int = 3) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """All patches as (images float32 [N, C, R, R] in [-1, 1], labels int64 [N]), like ``load_digits``."""
    import torch

    from speed.data.transforms import to_model_tensor

    images, labels = patches_uint8(resolution, channels)
    return to_model_tensor(np.array(images)).contiguous(), torch.from_numpy(labels.copy())


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_patches(uri: str, resolution: int = PATCHES_NATIVE_RESOLUTION, channels: int = 3,
                  storage_cfg: Optional["StorageConfig"] = None) -> Dict[str, object]:
    """Write the patches as an imagefolder, ``<uri>/<label>_<name>/<index>.png`` (class folders
    sort in label order, so the imagefolder's labels equal ``load_patches``'s). Returns a summary."""
    from speed import storage

    images, labels = patches_uint8(resolution, channels)
    folders = [f"{label}_{name}" for label, name in enumerate(CLASS_NAMES)]
    for index, (image, label) in enumerate(zip(images, labels)):
        storage.write_bytes(storage.join(uri, folders[int(label)], f"{index:05d}.png"), _png(image), storage_cfg)
    return {"uri": uri, "images": int(len(labels)), "classes": len(folders), "resolution": int(resolution),
            "channels": int(channels)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m speed.data.patches",
                                     description="Write the patches dataset as an imagefolder of PNG files.")
    parser.add_argument("--out", required=True, help="local folder or s3:// prefix")
    parser.add_argument("--resolution", type=int, default=PATCHES_NATIVE_RESOLUTION)
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    args = parser.parse_args(argv)
    print(json.dumps({"event": "patches_written", **write_patches(args.out, args.resolution, args.channels)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
