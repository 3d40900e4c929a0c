"""Image preprocessing: ADM center crop and flips against an independent PIL computation, and
decoding of every image mode."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from speed.data.transforms import (
    center_crop_arr,
    decode_image,
    flip_mask,
    load_and_crop,
    to_model_tensor,
    to_uint8_images,
)


@pytest.fixture(scope="module")
def china_jpeg() -> bytes:
    from sklearn.datasets import load_sample_image

    buffer = io.BytesIO()
    Image.fromarray(load_sample_image("china.jpg")).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _encode(image: Image.Image, format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("resolution", [64, 100, 256])
def test_center_crop_matches_independent_pil(china_jpeg, resolution):
    photo = Image.open(io.BytesIO(china_jpeg)).convert("RGB")  # 640 x 427
    # The ADM recipe spelled out step by step with PIL.
    expected = photo
    width, height = expected.size
    while min(width, height) >= 2 * resolution:
        width, height = width // 2, height // 2
        expected = expected.resize((width, height), Image.BOX)
    scale = resolution / min(width, height)
    width, height = round(width * scale), round(height * scale)
    expected = expected.resize((width, height), Image.BICUBIC)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    expected = np.asarray(expected.crop((left, top, left + resolution, top + resolution)))

    got = center_crop_arr(photo, resolution)
    assert got.shape == (resolution, resolution, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(load_and_crop(china_jpeg, resolution, 3), expected)

    # Flip and scaling against PIL's mirror.
    tensor = to_model_tensor(got[None], np.array([True]))
    mirrored = np.asarray(ImageOps.mirror(Image.fromarray(expected)), dtype=np.float32) / 127.5 - 1.0
    assert tensor.dtype == torch.float32 and tensor.shape == (1, 3, resolution, resolution)
    np.testing.assert_allclose(tensor[0].permute(1, 2, 0).numpy(), mirrored, atol=1e-6)
    unflipped = to_model_tensor(got[None], np.array([False]))[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(unflipped, expected.astype(np.float32) / 127.5 - 1.0, atol=1e-6)


def test_grey_crop_keeps_a_channel_axis(china_jpeg):
    grey = load_and_crop(china_jpeg, 32, 1)
    assert grey.shape == (32, 32, 1)


def test_model_tensor_range_and_roundtrip():
    batch = np.array([[[[0], [255]], [[128], [1]]]], dtype=np.uint8)  # [1, 2, 2, 1]
    tensor = to_model_tensor(batch)
    assert tensor.shape == (1, 1, 2, 2)
    assert tensor.min() == -1.0 and tensor.max() == 1.0
    np.testing.assert_array_equal(to_uint8_images(tensor), batch)
    with pytest.raises(ValueError, match="uint8"):
        to_model_tensor(batch.astype(np.float32))


def test_flip_mask_is_deterministic_and_fair():
    keys = [f"n{i % 7:08d}/img_{i}.JPEG" for i in range(2000)]
    first = flip_mask(keys, seed=3, epoch=1)
    np.testing.assert_array_equal(first, flip_mask(list(reversed(keys)), seed=3, epoch=1)[::-1])
    assert 0.45 < first.mean() < 0.55
    assert (first != flip_mask(keys, seed=3, epoch=2)).mean() > 0.4  # a new coin each epoch
    assert (first != flip_mask(keys, seed=4, epoch=1)).mean() > 0.4
    assert not flip_mask(keys, seed=3, epoch=1, enabled=False).any()


def test_decode_every_mode():
    rgb = Image.new("RGB", (6, 4), (200, 30, 10))
    cases = {
        "rgb_png": _encode(rgb, "PNG"),
        "grey": _encode(Image.new("L", (6, 4), 77), "PNG"),
        "palette": _encode(rgb.convert("P", palette=Image.ADAPTIVE), "PNG"),
        "cmyk_jpeg": _encode(Image.new("CMYK", (6, 4), (0, 255, 255, 0)), "JPEG", quality=95),
        "bilevel": _encode(Image.new("1", (6, 4), 1), "PNG"),
    }
    for name, data in cases.items():
        for channels in (1, 3):
            array = decode_image(data, channels)
            assert array.shape == (4, 6, channels) and array.dtype == np.uint8, name
    cmyk = decode_image(cases["cmyk_jpeg"], 3)
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60  # CMYK (0,255,255,0) is red

    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # invisible black: must become white
    np.testing.assert_array_equal(decode_image(_encode(transparent, "PNG"), 3), 255)
    half = Image.new("LA", (4, 4), (0, 128))
    assert abs(int(decode_image(_encode(half, "PNG"), 1)[0, 0, 0]) - 127) <= 1

    paletted = Image.new("P", (4, 4), 0)
    paletted.putpalette([10, 20, 30] * 256)
    paletted.info["transparency"] = 0
    np.testing.assert_array_equal(decode_image(_encode(paletted, "PNG", transparency=0), 3), 255)

    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    np.testing.assert_array_equal(decode_image(_encode(sixteen, "PNG"), 1), 255)
    np.testing.assert_array_equal(decode_image(_encode(sixteen, "PNG"), 3), 255)


def test_decode_rejects_bad_data(china_jpeg):
    with pytest.raises(ValueError, match="empty"):
        decode_image(b"", 3)
    with pytest.raises(Exception):
        decode_image(b"this is not an image", 3)
    with pytest.raises(Exception):
        decode_image(china_jpeg[: len(china_jpeg) // 2], 3)  # truncated
    with pytest.raises(ValueError, match="data.channels"):
        decode_image(china_jpeg, 4)
