"""The embedded digits dataset and its exact, seeded, index-based order."""

import numpy as np
import pytest
import torch

from speed.data.digits import (
    DIGITS_NUM_IMAGES,
    digits_batch_indices,
    digits_epoch_and_offset,
    load_digits,
)


def test_load_digits_native_and_upscaled():
    from sklearn.datasets import load_digits as sklearn_digits

    images, labels = load_digits(8, 1)
    assert images.shape == (DIGITS_NUM_IMAGES, 1, 8, 8) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.bincount().tolist() == np.bincount(sklearn_digits().target).tolist()
    expected = torch.from_numpy(sklearn_digits().images[5]).float() / 16 * 2 - 1
    torch.testing.assert_close(images[5, 0], expected)
    assert images.min() == -1.0 and images.max() == 1.0

    big, big_labels = load_digits(32, 3)
    assert big.shape == (DIGITS_NUM_IMAGES, 3, 32, 32)
    assert big.min() >= -1.0 and big.max() <= 1.0
    torch.testing.assert_close(big[:, 0], big[:, 2])
    assert torch.equal(big_labels, labels)
    # Upscaling keeps the picture: downsampling it again lands close to the original.
    back = torch.nn.functional.avg_pool2d(big[:, :1], 4)
    assert (back - images).abs().mean() < 0.15

    with pytest.raises(ValueError, match="data.channels"):
        load_digits(8, 4)


def test_batch_indices_cover_each_image_once_per_epoch():
    n, batch, seed = 50, 8, 7
    stream = torch.cat([digits_batch_indices(step, batch, n, seed) for step in range(25)])  # 200 = 4 epochs
    for epoch in range(4):
        assert sorted(stream[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n : 2 * n])  # a fresh permutation each epoch


def test_batch_indices_are_a_pure_function():
    first = digits_batch_indices(123, 64, DIGITS_NUM_IMAGES, seed=0)
    assert first.dtype == torch.int64 and first.shape == (64,)
    torch.manual_seed(999)  # global RNG state must not matter
    assert torch.equal(first, digits_batch_indices(123, 64, DIGITS_NUM_IMAGES, seed=0))
    assert not torch.equal(first, digits_batch_indices(123, 64, DIGITS_NUM_IMAGES, seed=1))
    # A batch straddling an epoch boundary continues into the next epoch's permutation.
    n = 10
    straddling = digits_batch_indices(1, 6, n, seed=0)  # positions 6..11
    assert torch.equal(straddling[:4], digits_batch_indices(0, 10, n, 0)[6:])
    assert torch.equal(straddling[4:], digits_batch_indices(1, 10, n, 0)[:2])
    # Batches larger than the dataset span several epochs.
    assert sorted(digits_batch_indices(0, 3 * n, n, 0).tolist()) == sorted(list(range(n)) * 3)
    assert digits_epoch_and_offset(2 * DIGITS_NUM_IMAGES + 5) == (2, 5)
    with pytest.raises(ValueError):
        digits_batch_indices(-1, 8, n, 0)
