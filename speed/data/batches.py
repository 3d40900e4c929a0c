"""Per-batch transforms that Ray Data runs in its read/decode tasks (pure numpy; no Ray here).

Each takes the columns of one batch and returns the training columns plus the bad inputs it
dropped, so the caller can count and log them; ``on_error="raise"`` raises ``BadInputError``
naming the file instead. Labels outside [0, num_classes) always stop with ``DataFormatError``:
they mean the data and the model disagree, which skipping would hide.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from speed.data.latents import CLEAN_IMAGE_FIELD, LatentShapeError, blobs_to_array
from speed.data.transforms import decode_image, flip_mask, load_and_crop, to_model_array


class BadInputError(ValueError):
    """An unreadable input under data.on_error=raise; the message names the file."""


class LabelRangeError(ValueError):
    """A label outside [0, model.num_classes)."""


@dataclass(frozen=True)
class BadInput:
    source: str  # the file URI, or 'file#row' for a Parquet row
    reason: str


def reject(source: str, reason: str, on_error: str) -> BadInput:
    """The bad-record policy: raise BadInputError under on_error=raise, else the BadInput to count."""
    if on_error == "raise":
        raise BadInputError(
            f"data.on_error=raise: cannot decode '{source}' ({reason}); fix or remove it, or set data.on_error=skip "
            "to count and skip bad files"
        )
    return BadInput(source, reason)


def content_key(blob: bytes) -> str:
    """A stable per-item key for data without file names (Parquet rows): a digest of its bytes."""
    return hashlib.blake2b(blob, digest_size=12).hexdigest()


def check_labels(labels: np.ndarray, num_classes: Optional[int], sources: Sequence[str]) -> None:
    if num_classes is None or labels.size == 0:
        return
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise LabelRangeError(
            f"'{sources[i]}' has label {int(labels[i])}, outside [0, model.num_classes={num_classes}); fix "
            "data.label_column / data.class_index_uri or raise model.num_classes"
        )


def decode_image_batch(
    blobs: Sequence[Optional[bytes]],
    labels: Sequence[Optional[int]],
    sources: Sequence[str],
    flip_keys: Optional[Sequence[str]] = None,
    *,
    resolution: int,
    channels: int,
    random_flip: bool,
    seed: int,
    epoch: int,
    on_error: str = "skip",
    num_classes: Optional[int] = None,
    decode: str = "exact",
) -> Tuple[Dict[str, np.ndarray], List[BadInput]]:
    """Encoded images -> {"image": float32 [n, C, R, R] in [-1, 1], "label": int64 [n]}.

    ``flip_keys`` name the items for the flip decision (default: a digest of each item's bytes).
    ``decode``: "fast" or "exact" (``speed.data.transforms.load_and_crop``).
    """
    crops, kept_labels, kept_keys, kept_sources, bad = [], [], [], [], []
    for i, blob in enumerate(blobs):
        label = labels[i]
        if label is None or (isinstance(label, float) and np.isnan(label)):
            bad.append(reject(sources[i], "missing label", on_error))
            continue
        if blob is None:
            bad.append(reject(sources[i], "missing image bytes", on_error))
            continue
        try:
            crops.append(load_and_crop(bytes(blob), resolution, channels, decode))
        except Exception as exc:  # PIL raises many types for corrupt data; all mean "not a usable image"
            bad.append(reject(sources[i], f"{type(exc).__name__}: {exc}", on_error))
            continue
        kept_labels.append(int(label))
        kept_keys.append(flip_keys[i] if flip_keys is not None else content_key(bytes(blob)))
        kept_sources.append(sources[i])
    label_array = np.asarray(kept_labels, dtype=np.int64)
    check_labels(label_array, num_classes, kept_sources)
    if not crops:
        return {"image": np.zeros((0, channels, resolution, resolution), np.float32), "label": label_array}, bad
    images = to_model_array(np.stack(crops), flip_mask(kept_keys, seed, epoch, enabled=random_flip))
    return {"image": images, "label": label_array}, bad


def decode_latent_batch(
    keys: Sequence[str],
    labels: Sequence[int],
    mean_blobs: Sequence[bytes],
    std_blobs: Sequence[bytes],
    *,
    latent_shape: Sequence[int],
    random_flip: bool,
    seed: int,
    epoch: int,
    num_classes: Optional[int] = None,
    image_blobs: Optional[Sequence[Optional[bytes]]] = None,
    image_resolution: int = 0,
) -> Dict[str, np.ndarray]:
    """Shard rows -> {"latent_mean", "latent_std": float16 [n, C, h, w], "label": int64 [n]}, one
    orientation per row (flipped where the (seed, epoch, key) coin says so and random_flip is on).

    ``image_blobs`` (the shard's clean images, unflipped, ``image_resolution`` px): also
    ``clean_image`` uint8 [n, 3, r, r], flipped exactly where the flipped latent is picked."""
    shape = (2, *[int(v) for v in latent_shape])
    means = blobs_to_array(mean_blobs, shape, keys)
    stds = blobs_to_array(std_blobs, shape, keys)
    label_array = np.asarray(labels, dtype=np.int64)
    check_labels(label_array, num_classes, keys)
    pick = flip_mask(keys, seed, epoch, enabled=random_flip).astype(np.int64)
    rows = np.arange(len(keys))
    out = {
        "latent_mean": np.ascontiguousarray(means[rows, pick]),
        "latent_std": np.ascontiguousarray(stds[rows, pick]),
        "label": label_array,
    }
    if image_blobs is not None:
        out[CLEAN_IMAGE_FIELD] = decode_clean_images(image_blobs, pick.astype(bool), image_resolution, keys)
    return out


def decode_clean_images(blobs: Sequence[Optional[bytes]], flips: np.ndarray, resolution: int,
                        keys: Sequence[str]) -> np.ndarray:
    """Stored clean images (PNG/JPEG bytes) -> uint8 [n, 3, r, r], mirrored where ``flips``."""
    out = np.empty((len(blobs), 3, resolution, resolution), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        try:
            pixels = decode_image(bytes(blob), 3) if blob else None
        except Exception as exc:  # PIL raises many types for corrupt data
            raise LatentShapeError(f"latent row '{keys[i]}' holds an unreadable image ({type(exc).__name__}: {exc}); "
                                   "the shard is corrupt: delete it and rerun the encode job") from None
        if pixels is None or pixels.shape != (resolution, resolution, 3):
            found = "no image" if pixels is None else f"a {pixels.shape[1]}x{pixels.shape[0]} image"
            raise LatentShapeError(
                f"latent row '{keys[i]}' holds {found}, not the {resolution}x{resolution} RGB image its _meta.json "
                "promises; the shard is corrupt or from another encode: delete it and rerun the encode job"
            )
        out[i] = (pixels[:, ::-1] if flips[i] else pixels).transpose(2, 0, 1)
    return out
