"""The ``patches`` dataset (crops of the photographs scikit-learn and matplotlib ship): deterministic,
balanced, the right shapes, the same as an imagefolder, and wired in as ``data.format=patches``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speed.config import ConfigError, load_config
from speed.data.builtin import builtin_num_classes, builtin_num_images, is_builtin, load_builtin
from speed.data.patches import (
    CLASS_NAMES,
    PATCHES_NUM_CLASSES,
    PATCHES_NUM_IMAGES,
    PER_CLASS,
    _crop_boxes,
    _patches_uint8,
    load_patches,
    patches_uint8,
    write_patches,
)


def test_shapes_range_and_class_balance():
    images, labels = load_patches(16, 3)
    assert images.shape == (PATCHES_NUM_IMAGES, 3, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (PATCHES_NUM_IMAGES,) and labels.dtype == torch.int64
    assert -1.0 <= float(images.min()) < -0.9 and 0.9 < float(images.max()) <= 1.0
    assert labels.bincount().tolist() == [PER_CLASS] * PATCHES_NUM_CLASSES
    assert len(CLASS_NAMES) == PATCHES_NUM_CLASSES == 10
    grey, _ = load_patches(8, 1)
    assert grey.shape == (PATCHES_NUM_IMAGES, 1, 8, 8)
    # Classes are not trivially separable by their mean colour alone, but do differ.
    means = torch.stack([images[labels == c].mean(dim=(0, 2, 3)) for c in range(10)])
    assert torch.cdist(means, means).fill_diagonal_(1e9).min() > 0.02


def test_generation_is_deterministic():
    first_boxes = _crop_boxes(0)
    assert first_boxes == _crop_boxes(0) and first_boxes != _crop_boxes(1)
    images, labels = patches_uint8(16, 3)
    _patches_uint8.cache_clear()  # regenerate from the source photographs
    again, again_labels = patches_uint8(16, 3)
    assert np.array_equal(images, again) and np.array_equal(labels, again_labels)
    with pytest.raises(ValueError, match="data.channels=4"):
        patches_uint8(16, 4)


def test_imagefolder_matches_in_memory(tmp_path):
    from speed.data.catalog import scan_imagefolder
    from speed.data.transforms import load_and_crop

    summary = write_patches(str(tmp_path / "patches"), resolution=8, channels=3)
    assert summary["images"] == PATCHES_NUM_IMAGES and summary["classes"] == 10
    cfg = load_config(None, ["data.format=imagefolder", f"data.uri={tmp_path / 'patches'}", "data.resolution=8",
                             "data.channels=3"])
    catalog = scan_imagefolder(cfg.data, None, 10)
    assert len(catalog.files) == PATCHES_NUM_IMAGES
    assert [catalog.class_to_label[f"{i}_{n}"] for i, n in enumerate(CLASS_NAMES)] == list(range(10))
    images, labels = patches_uint8(8, 3)
    for relative in catalog.files[::700]:
        index = int(relative.rsplit("/", 1)[1].split(".")[0])
        decoded = load_and_crop((tmp_path / "patches" / relative).read_bytes(), 8, 3)
        assert np.array_equal(decoded, images[index])  # PNG is lossless
        assert catalog.class_to_label[relative.split("/")[0]] == labels[index]


def test_builtin_format_is_wired():
    cfg = load_config(None, ["data.format=patches", "data.resolution=16", "data.channels=3"])
    assert is_builtin("patches") and builtin_num_images("patches") == 3000 and builtin_num_classes("patches") == 10
    images, labels = load_builtin(cfg.data.format, cfg.data.resolution, cfg.data.channels)
    assert images.shape == (3000, 3, 16, 16) and len(labels) == 3000
    with pytest.raises((ConfigError, ValueError), match="data.format"):
        load_config(None, ["data.format=nonesuch"])
    from ray_jobs.data import dataset_size, num_classes_found, preflight_data

    assert dataset_size(cfg) == 3000 and num_classes_found(cfg) == 10
    assert preflight_data(cfg)["format"] == "patches"


def test_training_loop_evaluates_patches_with_its_own_evaluator(tmp_path, monkeypatch):
    """A 2-step in-process run on data.format=patches logs fid_patches from a classifier trained on
    the patches, cached under <run.output_uri>/cache by the dataset's name."""
    from speed.data.builtin import load_builtin
    from speed.evaluate import dataset_fid
    from speed.train import loop
    from speed.train.distributed import DistEnv
    from speed.train.run_layout import RunLayout
    from speed.train.sources import IndexedSource, LocalReporter

    monkeypatch.setattr(dataset_fid, "TARGET_STEPS", 20)  # the recipe's cost is not what is tested here
    monkeypatch.setattr(dataset_fid, "_CACHE", {})
    cfg = load_config(None, ["model.name=DiT-N/2", "data.format=patches", "data.resolution=8", "data.channels=3",
                             "train.steps=2", "train.log_every=1", "train.eval_every=2", "train.eval_num_samples=20",
                             "train.sample_every=0", "train.checkpoint_every=100", "sampling.steps=2",
                             "parallel.strategy=none", f"run.output_uri={tmp_path}", "run.name=patches"])
    images, labels = load_builtin("patches", 8, 3)
    result = loop.train(cfg, DistEnv(), IndexedSource(images, labels, 0, cfg.train.global_batch_size),
                        LocalReporter(RunLayout.for_run(cfg.run)), progress=False)
    evaluated = [r for r in result.history if "fid_patches" in r]
    assert evaluated and evaluated[-1]["step"] == 2 and evaluated[-1]["fid_patches"] > 0
    assert not any("digits_fid" in r or "fid_digits" in r for r in result.history)
    assert [p.name.split("-")[:2] for p in (tmp_path / "cache").iterdir()] == [["eval", "patches"]]
