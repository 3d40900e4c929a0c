"""Image preprocessing as in ADM / DiT, plus decoding of any image mode.

Every function here is pure and runs inside Ray Data tasks (``ray_jobs.data``), in the encode job
and in tests alike:

* ``decode_image`` / ``open_image``: bytes -> RGB or grey, whatever the file's mode (grey, palette,
  CMYK, alpha, 16-bit). Transparent pixels are composited onto white, so hidden colour under
  alpha 0 never reaches the model.
* ``center_crop_arr``: ADM's resize (box-downsample by 2 while the short side is at least twice
  the target, then bicubic so the short side equals the target) and center crop.
* ``load_and_crop(data, resolution, channels, decode)``: both at once. ``decode="fast"`` (the
  default of ``data.decode``) lets libjpeg do ADM's halvings in the DCT domain (PIL's draft mode:
  a JPEG whose short side is at least twice the target is decoded at 1/2 or 1/4 scale, the
  halvings ADM's loop would make, and ADM's box filter does any further ones), so the full-size image is never built; other
  formats and modes fall back to the exact path. The crops stay within a tested tolerance of the
  exact ones (``tests/test_data_transforms.py``). ``decode="exact"`` is ADM's recipe bit for bit.
* ``to_model_tensor``: uint8 HWC -> float32 NCHW in [-1, 1], with horizontal flips.
* ``flip_mask``: flip decisions that depend only on (seed, epoch, item key).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

from speed.seeding import hash_flip_mask

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _channel_mode(channels: int) -> str:
    if channels == 3:
        return "RGB"
    if channels == 1:
        return "L"
    raise ValueError(f"data.channels={channels} is not valid for images; use 1 (grey) or 3 (RGB)")


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """16-bit and float images -> 8-bit grey (PIL's own convert would clip them at 255)."""
    array = np.asarray(image)
    if image.mode == "F":
        # Float images are taken to hold intensities in [0, 1].
        scaled = np.clip(array, 0.0, 1.0) * 255.0
    else:
        scaled = np.clip(array.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


DECODE_MODES = ("fast", "exact")
# JPEG modes whose DCT-domain scaling matches a box downsample of the decoded pixels.
_DRAFT_MODES = ("RGB", "L", "CMYK")
MAX_DRAFT_DIVISOR = 7  # width // request <= 7 makes libjpeg pick a scale of at most 1/4


def open_image(data: bytes, channels: int, draft_size: Optional[int] = None) -> Image.Image:
    """Decode encoded image bytes into a PIL image of mode RGB (channels=3) or L (channels=1).

    ``draft_size``: for JPEGs, let the decoder scale by 1/2 or 1/4 while the short side stays
    at least this large (PIL's draft mode); None decodes at full size.

    Raises ValueError (empty data) or PIL's errors (not an image, truncated file); callers apply
    ``data.on_error``.
    """
    target_mode = _channel_mode(channels)
    if not data:
        raise ValueError("empty file (0 bytes)")
    image = Image.open(io.BytesIO(data))
    full, scale = image.size, 1
    if draft_size and image.format == "JPEG" and image.mode in _DRAFT_MODES:
        # At most 1/4: libjpeg's 1/8 scale keeps only each block's mean, too far from ADM's box filter.
        width, height = image.size
        request = (max(draft_size, -(-width // MAX_DRAFT_DIVISOR)), max(draft_size, -(-height // MAX_DRAFT_DIVISOR)))
        configured = image.draft(None, request)
        if configured is not None:
            scale = round(full[0] / configured[1][2])
    image.load()  # decode now: truncated or corrupt data fails here, not later
    if scale > 1:
        # libjpeg rounds scaled sizes up, ADM's halvings round down: drop the partial last
        # row/column so the crop's geometry is ADM's.
        image = image.crop((0, 0, full[0] // scale, full[1] // scale))
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        image = _to_eight_bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != target_mode:
        image = image.convert(target_mode)
    return image


def _as_hwc(array: np.ndarray) -> np.ndarray:
    return array[:, :, None] if array.ndim == 2 else array


def decode_image(data: bytes, channels: int) -> np.ndarray:
    """Encoded bytes -> uint8 array [H, W, channels]."""
    return _as_hwc(np.asarray(open_image(data, channels), dtype=np.uint8))


def center_crop_arr(pil_image: Image.Image, resolution: int) -> np.ndarray:
    """ADM's ``center_crop_arr``: uint8 array [resolution, resolution, C] (C=1 for grey images).

    While the short side is at least twice the target, halve the image with a box filter (cheap
    anti-aliasing); then resize bicubically so the short side equals ``resolution``; then take the
    center square.
    """
    while min(*pil_image.size) >= 2 * resolution:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.BOX)
    scale = resolution / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(side * scale) for side in pil_image.size), resample=Image.BICUBIC)
    array = _as_hwc(np.asarray(pil_image, dtype=np.uint8))
    top = (array.shape[0] - resolution) // 2
    left = (array.shape[1] - resolution) // 2
    return np.ascontiguousarray(array[top : top + resolution, left : left + resolution])


def load_and_crop(data: bytes, resolution: int, channels: int, decode: str = "exact") -> np.ndarray:
    """Encoded bytes -> preprocessed uint8 [resolution, resolution, channels].

    ``decode``: "exact" (ADM's recipe on the full-size image) or "fast" (JPEG draft mode first;
    see the module docstring)."""
    if decode not in DECODE_MODES:
        raise ValueError(f"data.decode={decode!r} is not valid; choose one of {', '.join(DECODE_MODES)}")
    return center_crop_arr(open_image(data, channels, resolution if decode == "fast" else None), resolution)


def flip_mask(keys: Iterable[str], seed: int, epoch: int, enabled: bool = True) -> np.ndarray:
    """Bool [N]: which items to flip horizontally. All False when ``enabled`` is False."""
    keys = list(keys)
    if not enabled:
        return np.zeros(len(keys), dtype=bool)
    return hash_flip_mask(keys, seed, epoch)


def to_model_array(batch: np.ndarray, flips: Optional[np.ndarray] = None) -> np.ndarray:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W] in [-1, 1], flipping rows where ``flips``."""
    batch = np.asarray(batch)
    if batch.ndim != 4 or batch.dtype != np.uint8:
        raise ValueError(f"expected a uint8 batch [N, H, W, C], got {batch.dtype} {tuple(batch.shape)}")
    out = batch.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    if flips is not None:
        flips = np.asarray(flips, dtype=bool)
        if flips.shape != (batch.shape[0],):
            raise ValueError(f"flip mask has shape {flips.shape}; expected ({batch.shape[0]},)")
        out[flips] = out[flips][..., ::-1]
    return np.ascontiguousarray(out)


def to_model_tensor(
    batch: Union[np.ndarray, "torch.Tensor"], flips: Optional[Union[np.ndarray, "torch.Tensor", Sequence[bool]]] = None
) -> "torch.Tensor":
    """uint8 [N, H, W, C] -> float32 tensor [N, C, H, W] in [-1, 1], flipped where ``flips``."""
    import torch  # imported lazily so that Ray Data decode workers never pay for it

    if isinstance(batch, torch.Tensor):
        batch = batch.cpu().numpy()
    if isinstance(flips, torch.Tensor):
        flips = flips.cpu().numpy()
    return torch.from_numpy(to_model_array(batch, None if flips is None else np.asarray(flips, dtype=bool)))


def to_uint8_images(images: "torch.Tensor") -> np.ndarray:
    """float [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C] (for writing images)."""
    import torch

    scaled = ((images.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def encode_image(array: np.ndarray, format: str = "JPEG", quality: int = 95) -> bytes:
    """uint8 [H, W, C] (C 1 or 3) -> encoded bytes (JPEG or PNG)."""
    array = np.asarray(array, dtype=np.uint8)
    image = Image.fromarray(array[:, :, 0] if array.shape[-1] == 1 else array)  # 2-D -> L, 3-D -> RGB
    buffer = io.BytesIO()
    if format.upper() == "JPEG":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format=format.upper())
    return buffer.getvalue()
