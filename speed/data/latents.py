"""The ``latents`` format: SD-VAE posteriors of every image and of its horizontal flip.

Layout under ``prepare.output_uri`` (written by ``python -m ray_jobs.prepare`` with
``prepare.task=encode``):

  _meta.json                          format, latent shape, VAE identity, class index, shard count
  latents-000000-of-000042.parquet    one row per image:
      key          string   the source item (``wnid/name.JPEG`` or ``file.parquet#row``)
      label        int64
      latent_mean  binary   float16 [2, C, h, w]: posterior mean of [image, flipped image]
      latent_std   binary   float16 [2, C, h, w]: posterior std, same order
      image        binary   only with ``prepare.keep_images=true``: the clean center crop (PNG or
                            JPEG bytes, ``_meta.json`` "images": {format, resolution, channels}),
                            unflipped; a reader that picks the flipped latent flips it too

Training rows (``ray_jobs.data.build_train_dataset``) carry one orientation, already chosen
(deterministically per seed, epoch and key when ``data.random_flip``): ``latent_mean`` and
``latent_std`` float16 [C, h, w] plus ``label``. The trainer draws a fresh posterior sample each
time it sees an image, ``x0 = (mean + std * eps) * data.latent_scale``, with ``sample_latents``.
When REPA is on, the rows also carry ``clean_image`` uint8 [3, r, r], flipped exactly when the
latent is the flipped one (``check_latent_images`` refuses latents encoded without images).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # torch is imported where used: Ray Data decode workers never need it
    import torch

LATENT_META_NAME = "_meta.json"
LATENT_FORMAT = "speed-latents"
LATENT_FORMAT_VERSION = 1
LATENT_COLUMNS = ("key", "label", "latent_mean", "latent_std")
LATENT_IMAGE_COLUMN = "image"  # optional: the clean image (prepare.keep_images)
CLEAN_IMAGE_FIELD = "clean_image"  # training rows: uint8 [3, r, r], oriented like the latent
IMAGE_FORMATS = ("png", "jpeg")
ORIENTATIONS = ("original", "hflip")
VAE_DOWNSAMPLE = 8


class LatentShapeError(ValueError):
    """A latent shard whose rows do not hold the shape its _meta.json promises."""


def shard_name(index: int, count: int) -> str:
    return f"latents-{index:06d}-of-{count:06d}.parquet"


def expected_shard_names(count: int) -> List[str]:
    return [shard_name(i, count) for i in range(count)]


def check_latent_meta(meta: Dict[str, Any], uri: str, *, resolution: Optional[int] = None, channels: Optional[int] = None) -> Tuple[int, int, int]:
    """Validate _meta.json against the data config; returns the latent shape (C, h, w)."""
    where = f"data.uri: '{uri}'"
    if meta.get("format") != LATENT_FORMAT or int(meta.get("version", -1)) != LATENT_FORMAT_VERSION:
        raise ValueError(
            f"{where} holds {LATENT_META_NAME} of format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"expected {LATENT_FORMAT!r} version {LATENT_FORMAT_VERSION} (re-encode with the encode job)"
        )
    shape = tuple(int(v) for v in meta.get("latent_shape", ()))
    if len(shape) != 3:
        raise ValueError(f"{where}: {LATENT_META_NAME} has latent_shape {meta.get('latent_shape')!r}; expected [C, h, w]")
    encoded_at = int(meta.get("resolution", 0))
    if resolution is not None and (encoded_at != resolution or shape[1:] != (resolution // VAE_DOWNSAMPLE,) * 2):
        raise ValueError(
            f"data.resolution={resolution} does not match the latents under '{uri}', encoded at {encoded_at} "
            f"(latent {shape[1]}x{shape[2]}); set data.resolution={encoded_at} or re-encode"
        )
    if channels is not None and channels != shape[0]:
        raise ValueError(
            f"data.channels={channels} does not match the latents under '{uri}', which have {shape[0]} channels; "
            f"set data.channels={shape[0]}"
        )
    return shape  # type: ignore[return-value]


def latent_shard_table(keys: Sequence[str], labels: np.ndarray, means: np.ndarray, stds: np.ndarray,
                       images: Optional[Sequence[bytes]] = None) -> pa.Table:
    """Rows of one shard. ``means``/``stds``: float16 [N, 2, C, h, w] (original, flipped);
    ``images``: the encoded clean (unflipped) image of each row, or None for no image column."""
    means = np.ascontiguousarray(means, dtype=np.float16)
    stds = np.ascontiguousarray(stds, dtype=np.float16)
    if means.shape != stds.shape or means.ndim != 5 or means.shape[1] != len(ORIENTATIONS):
        raise ValueError(f"latent arrays must be [N, 2, C, h, w]; got mean {means.shape}, std {stds.shape}")
    columns = {
        "key": pa.array(list(keys), type=pa.string()),
        "label": pa.array(np.asarray(labels, dtype=np.int64)),
        "latent_mean": pa.array([row.tobytes() for row in means], type=pa.binary()),
        "latent_std": pa.array([row.tobytes() for row in stds], type=pa.binary()),
    }
    if images is not None:
        if len(images) != len(means):
            raise ValueError(f"{len(images)} images for {len(means)} latent rows")
        columns[LATENT_IMAGE_COLUMN] = pa.array([bytes(blob) for blob in images], type=pa.binary())
    return pa.table(columns)


def check_latent_images(meta: Optional[Dict[str, Any]], uri: str) -> Dict[str, Any]:
    """The clean images' description in _meta.json ({format, resolution, channels}); a ValueError
    naming the fix when the latents were encoded without them (REPA on latents needs them)."""
    images = (meta or {}).get("images")
    if not images:
        raise ValueError(
            f"repa.encoder is set, but the latents under data.uri '{uri}' carry no clean images, and REPA's encoder "
            "must see the image, never the latent; re-encode with prepare.keep_images=true (python -m "
            "ray_jobs.prepare -c configs/prepare/encode_imagenet.yaml prepare.keep_images=true), or unset repa.encoder"
        )
    if images.get("format") not in IMAGE_FORMATS or int(images.get("resolution", 0)) <= 0:
        raise ValueError(f"data.uri: '{uri}' has an unreadable \"images\" entry in {LATENT_META_NAME} ({images!r}); "
                         "re-encode with prepare.keep_images=true")
    return images


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def blobs_to_array(blobs: Sequence[bytes], shape: Sequence[int], where: Sequence[str]) -> np.ndarray:
    """Stored float16 blobs -> array [N, *shape]; a blob of the wrong size stops with a clear error."""
    expected = int(np.prod(shape)) * 2
    out = np.empty((len(blobs), *shape), dtype=np.float16)
    for i, blob in enumerate(blobs):
        if blob is None or len(blob) != expected:
            size = "null" if blob is None else f"{len(blob)} bytes"
            raise LatentShapeError(
                f"latent row '{where[i]}' holds {size}, not float16 {list(shape)} ({expected} bytes) as the shard's "
                f"{LATENT_META_NAME} says; the shard is corrupt or from another encoder: delete it and rerun the encode job"
            )
        out[i] = np.frombuffer(blob, dtype=np.float16).reshape(shape)
    return out


def sample_latents(
    mean: "torch.Tensor",
    std: "torch.Tensor",
    flip_mask: Optional["torch.Tensor"],
    scale: float,
    generator: Optional["torch.Generator"] = None,
) -> "torch.Tensor":
    """A fresh posterior sample for training: ``(mean + std * eps) * scale`` in float32.

    ``mean``/``std`` are either training rows, [N, C, h, w] with the orientation already chosen
    (pass ``flip_mask=None``), or shard rows with both orientations, [N, 2, C, h, w], where
    ``flip_mask`` (bool [N]) picks the flipped posterior. ``eps`` comes from ``generator`` (on the
    tensors' device) so a seeded trainer is reproducible.
    """
    import torch

    if mean.shape != std.shape:
        raise ValueError(f"latent mean {tuple(mean.shape)} and std {tuple(std.shape)} differ in shape")
    mean = mean.float()
    std = std.float()
    if mean.ndim == 5:
        if mean.shape[1] != len(ORIENTATIONS):
            raise ValueError(f"latents with orientations must be [N, 2, C, h, w]; got {tuple(mean.shape)}")
        if flip_mask is None:
            flip_mask = torch.zeros(mean.shape[0], dtype=torch.bool, device=mean.device)
        pick = flip_mask.to(device=mean.device, dtype=torch.long)
        rows = torch.arange(mean.shape[0], device=mean.device)
        mean, std = mean[rows, pick], std[rows, pick]
    elif mean.ndim == 4:
        if flip_mask is not None:
            raise ValueError(
                "these latents already carry one orientation ([N, C, h, w], chosen by the data pipeline); "
                "pass flip_mask=None"
            )
    else:
        raise ValueError(f"latents must be [N, C, h, w] or [N, 2, C, h, w]; got {tuple(mean.shape)}")
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * scale
