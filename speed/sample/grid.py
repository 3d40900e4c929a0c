"""Image grids as PNG bytes (preview grids, training-time sample grids)."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

# Small images (8x8 digits) are scaled up so a grid is readable in a browser or TensorBoard.
_MIN_CELL_PIXELS = 32


def grid_array(images_uint8_nhwc: np.ndarray, nrow: int, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] into one uint8 image, ``nrow`` images per row."""
    images = np.asarray(images_uint8_nhwc)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"make_grid_png expects uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"make_grid_png expects 1 or 3 channels, got {images.shape[-1]}")
    count, height, width, channels = images.shape
    if count == 0:
        raise ValueError("make_grid_png got no images")
    ncols = max(1, min(int(nrow), count))
    nrows = math.ceil(count / ncols)
    grid = np.full(
        (nrows * (height + padding) + padding, ncols * (width + padding) + padding, channels),
        pad_value,
        dtype=np.uint8,
    )
    for k in range(count):
        r, c = divmod(k, ncols)
        top = padding + r * (height + padding)
        left = padding + c * (width + padding)
        grid[top : top + height, left : left + width] = images[k]
    return grid


def make_grid_png(images_uint8_nhwc: np.ndarray, nrow: int) -> bytes:
    """PNG bytes of a grid of uint8 images [N, H, W, C] with ``nrow`` images per row."""
    images = np.asarray(images_uint8_nhwc)
    grid = grid_array(images, nrow)
    cell = images.shape[1]
    scale = max(1, math.ceil(_MIN_CELL_PIXELS / max(cell, 1)))
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), resample=Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
