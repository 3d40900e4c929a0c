"""The latents format's pure parts: posterior sampling for the trainer, shard rows, and the
file-granular epoch plans used to resume streamed data."""

import numpy as np
import pytest
import torch

from speed.data.batches import decode_latent_batch
from speed.data.catalog import DatasetCatalog, plan_epoch
from speed.data.latents import LatentShapeError, latent_shard_table, sample_latents
from speed.data.transforms import flip_mask


def test_sample_latents_picks_orientation_and_scales():
    mean = torch.randn(6, 2, 4, 3, 3)
    std = torch.rand(6, 2, 4, 3, 3)
    flips = torch.tensor([True, False, True, False, False, True])
    zero = sample_latents(mean, torch.zeros_like(std), flips, 0.5, torch.Generator().manual_seed(0))
    expected = torch.stack([mean[i, int(f)] for i, f in enumerate(flips)]) * 0.5
    torch.testing.assert_close(zero, expected)

    first = sample_latents(mean, std, flips, 0.18215, torch.Generator().manual_seed(3))
    again = sample_latents(mean, std, flips, 0.18215, torch.Generator().manual_seed(3))
    assert first.shape == (6, 4, 3, 3) and first.dtype == torch.float32 and torch.equal(first, again)

    # Training rows already carry one orientation (float16, as the pipeline delivers them).
    rows = sample_latents(mean[:, 0].half(), std[:, 0].half(), None, 1.0, torch.Generator().manual_seed(3))
    assert rows.shape == (6, 4, 3, 3) and rows.dtype == torch.float32
    draws = torch.stack([sample_latents(mean[:1, 0], std[:1, 0], None, 1.0) for _ in range(4000)])
    torch.testing.assert_close(draws.std(0)[0], std[0, 0], atol=0.05, rtol=0.1)
    with pytest.raises(ValueError, match="flip_mask=None"):
        sample_latents(mean[:, 0], std[:, 0], flips, 1.0)


def test_latent_rows_choose_the_seeded_orientation():
    keys = [f"n{i:08d}/img.JPEG" for i in range(8)]
    means = np.random.default_rng(0).standard_normal((8, 2, 4, 2, 2)).astype(np.float16)
    stds = np.abs(means) + np.float16(0.1)
    table = latent_shard_table(keys, np.arange(8), means, stds)
    out = decode_latent_batch(
        table.column("key").to_pylist(), table.column("label").to_numpy(), table.column("latent_mean").to_pylist(),
        table.column("latent_std").to_pylist(), latent_shape=(4, 2, 2), random_flip=True, seed=2, epoch=5, num_classes=10,
    )
    flips = flip_mask(keys, 2, 5).astype(int)
    assert out["latent_mean"].dtype == np.float16 and out["latent_mean"].shape == (8, 4, 2, 2)
    np.testing.assert_array_equal(out["latent_mean"], means[np.arange(8), flips])
    np.testing.assert_array_equal(out["latent_std"], stds[np.arange(8), flips])
    unflipped = decode_latent_batch(keys, np.arange(8), list(table.column("latent_mean").to_pylist()),
                                    list(table.column("latent_std").to_pylist()), latent_shape=(4, 2, 2),
                                    random_flip=False, seed=2, epoch=5)
    np.testing.assert_array_equal(unflipped["latent_mean"], means[:, 0])

    with pytest.raises(LatentShapeError, match="n00000000/img.JPEG.*float16 \\[2, 4, 4, 4\\]"):
        decode_latent_batch(keys, np.arange(8), table.column("latent_mean").to_pylist(),
                            table.column("latent_std").to_pylist(), latent_shape=(4, 4, 4), random_flip=False,
                            seed=0, epoch=0)
    with pytest.raises(ValueError, match="model.num_classes=4"):
        decode_latent_batch(keys, np.arange(8), table.column("latent_mean").to_pylist(),
                            table.column("latent_std").to_pylist(), latent_shape=(4, 2, 2), random_flip=False,
                            seed=0, epoch=0, num_classes=4)


def test_epoch_plans_skip_whole_files_only():
    catalog = DatasetCatalog(format="parquet", uri="s3://b/p", root="b/p", files=["a", "b", "c", "d"], rows=[10, 20, 30, 40])
    full = plan_epoch(catalog, seed=1, epoch=0)
    assert sorted(full.files) == ["a", "b", "c", "d"] and full.images_skipped == 0
    assert plan_epoch(catalog, 1, 0).files == full.files  # pure
    assert plan_epoch(catalog, 1, 1).files != full.files or plan_epoch(catalog, 1, 2).files != full.files
    first = full.rows[0]
    partial = plan_epoch(catalog, 1, 0, skip_images=first - 1)
    assert partial.files == full.files and partial.images_skipped == 0  # a partly read file is read again
    resumed = plan_epoch(catalog, 1, 0, skip_images=first + full.rows[1] - 1)
    assert resumed.files == full.files[1:] and resumed.images_skipped == first
    with pytest.raises(ValueError, match="skip_images=100"):
        plan_epoch(catalog, 1, 0, skip_images=100)


def test_clean_images_travel_with_their_latent_and_flip_with_it():
    """REPA on latents: the stored (unflipped) image is flipped exactly when the flipped latent is
    picked, so the encoder's target always shows what the latent encodes."""
    from speed.data import records
    from speed.data.latents import CLEAN_IMAGE_FIELD, check_latent_images
    from speed.data.transforms import encode_image

    rng = np.random.default_rng(1)
    keys = [f"n{i:08d}/img{i}.JPEG" for i in range(16)]
    pictures = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    # Latent "orientations" that say which way they face: [i, 0] = i, [i, 1] = -i - 1.
    means = np.stack([np.stack([np.full((4, 1, 1), i), np.full((4, 1, 1), -i - 1)]) for i in range(16)]).astype(np.float16)
    table = latent_shard_table(keys, np.arange(16) % 10, means, np.ones_like(means),
                               images=[encode_image(p, "PNG") for p in pictures])
    batch = {name: np.asarray(table.column(name).to_pylist(), dtype=object) for name in table.column_names}
    meta = {"images": {"format": "png", "resolution": 8, "channels": 3}}
    spec = records.DecodeSpec(format="latents", uri="mem://latents", root="", resolution=8, channels=4,
                              random_flip=True, seed=3, epoch=1, latent_shape=(4, 1, 1),
                              image_resolution=int(check_latent_images(meta, "mem://latents")["resolution"]))
    out = records.latent_records(batch, spec)
    flips = flip_mask(keys, 3, 1)
    assert 0 < flips.sum() < 16  # both orientations occur
    clean = out[CLEAN_IMAGE_FIELD]
    assert clean.dtype == np.uint8 and clean.shape == (16, 3, 8, 8)
    for i in range(16):
        flipped = out["latent_mean"][i, 0, 0, 0] < 0
        assert flipped == flips[i]
        expected = pictures[i][:, ::-1] if flipped else pictures[i]
        np.testing.assert_array_equal(clean[i], expected.transpose(2, 0, 1))
    # Without random flips nothing is flipped; without the spec asking, no image is decoded.
    plain = records.latent_records(batch, records.DecodeSpec(**{**spec.to_dict(), "random_flip": False}))
    np.testing.assert_array_equal(plain[CLEAN_IMAGE_FIELD], pictures.transpose(0, 3, 1, 2))
    assert CLEAN_IMAGE_FIELD not in records.latent_records(batch, records.DecodeSpec(**{**spec.to_dict(),
                                                                                        "image_resolution": 0}))
    # Latents encoded without images are refused with the fix.
    with pytest.raises(ValueError, match="prepare.keep_images=true"):
        check_latent_images({"images": None}, "s3://b/latents")
    no_images = {k: v for k, v in batch.items() if k != "image"}
    with pytest.raises(LatentShapeError, match="prepare.keep_images=true"):
        records.latent_records(no_images, spec)
    with pytest.raises(LatentShapeError, match="img0.JPEG.*8x8"):
        records.latent_records(batch, records.DecodeSpec(**{**spec.to_dict(), "image_resolution": 16}))
