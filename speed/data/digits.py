"""The embedded dataset: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes).

It lives in memory, so it needs no storage and no Ray Data; instead it has an exact, seeded,
index-based order (``digits_batch_indices``): global batch ``step`` is a pure function of
(step, batch size, seed), so a run resumed from a checkpoint at any step sees exactly the samples
an uninterrupted run would have seen.

Random horizontal flips are never applied to digits, whatever ``data.random_flip`` says: a
mirrored 2, 3, 4, 5, 6, 7 or 9 is not that digit any more, so flipping would teach the model
wrong class-conditional images. ``data.random_flip`` applies to imagefolder and parquet data.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Tuple

import numpy as np

if TYPE_CHECKING:  # torch is imported where used, so the constants here come without it
    import torch

from speed.seeding import epoch_permutation

DIGITS_NUM_IMAGES = 1797
DIGITS_NUM_CLASSES = 10
DIGITS_NATIVE_RESOLUTION = 8
DIGITS_MAX_VALUE = 16.0  # sklearn stores ink intensity as integers 0..16


@lru_cache(maxsize=1)
def _raw_digits() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def load_digits(resolution: int, channels: int) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """All digits as (images float32 [N, C, R, R] in [-1, 1], labels int64 [N]).

    Resolutions other than 8 are bicubic-upscaled (then clamped back into [-1, 1], since bicubic
    overshoots); ``channels`` 3 repeats the grey channel.
    """
    import torch
    import torch.nn.functional as F

    if resolution <= 0:
        raise ValueError(f"data.resolution={resolution} must be > 0 for the digits dataset")
    if channels not in (1, 3):
        raise ValueError(f"data.channels={channels} is not valid for digits; use 1 (grey) or 3 (RGB)")
    raw_images, raw_labels = _raw_digits()
    images = torch.from_numpy(raw_images).unsqueeze(1) / DIGITS_MAX_VALUE * 2.0 - 1.0  # [N, 1, 8, 8]
    if resolution != DIGITS_NATIVE_RESOLUTION:
        images = F.interpolate(images, size=(resolution, resolution), mode="bicubic", align_corners=False)
        images = images.clamp_(-1.0, 1.0)
    if channels == 3:
        images = images.repeat(1, 3, 1, 1)
    return images.contiguous(), torch.from_numpy(raw_labels.copy())


def digits_batch_indices(step: int, global_batch: int, num_images: int, seed: int) -> "torch.Tensor":
    """Indices (LongTensor [global_batch]) of the images in global batch ``step``.

    The sample stream is the concatenation of per-epoch permutations (``epoch_permutation(N,
    seed, epoch)`` for epoch 0, 1, 2, ...); batch ``step`` is stream positions
    [step * B, (step + 1) * B). Each image appears exactly once per epoch, and batches may straddle
    an epoch boundary. Being a pure function of its arguments, it resumes sample-exactly.
    """
    if step < 0 or global_batch <= 0 or num_images <= 0:
        raise ValueError(
            f"digits_batch_indices needs step >= 0, global_batch > 0 and num_images > 0 "
            f"(got step={step}, global_batch={global_batch}, num_images={num_images})"
        )
    import torch

    start = step * global_batch
    stop = start + global_batch
    first_epoch, last_epoch = start // num_images, (stop - 1) // num_images
    stream = torch.cat([epoch_permutation(num_images, seed, epoch) for epoch in range(first_epoch, last_epoch + 1)])
    offset = start - first_epoch * num_images
    return stream[offset : offset + global_batch].clone()


def digits_epoch_and_offset(images_seen: int, num_images: int = DIGITS_NUM_IMAGES) -> Tuple[int, int]:
    """(epoch, position within that epoch) after ``images_seen`` images."""
    return images_seen // num_images, images_seen % num_images
