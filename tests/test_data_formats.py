"""The formats users already have (WebDataset tar shards, the Hugging Face Parquet layout), the fast
JPEG decode against ADM's crop, and the stored catalog: plain functions, no Ray."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from speed import storage
from speed.config import load_config
from speed.data import records
from speed.data.batches import BadInputError
from speed.data.catalog import CATALOG_NAME, DataFormatError, load_catalog, scan_dataset
from speed.data.transforms import load_and_crop
from speed.data.webdataset import (
    expand_braces,
    iter_samples,
    parse_label,
    pattern_root,
    sample_members,
    scan_shard,
    split_name,
    tar_bytes,
)


def _data(*overrides):
    return load_config("configs/digits/speed.yaml", [*overrides]).data


def _jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _picture(seed: int, size=(20, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


# --- fast decode ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos():
    """Natural photos at ImageNet-like and larger sizes (scikit-learn's bundled pictures, rescaled)."""
    from sklearn.datasets import load_sample_images

    out = []
    for photo in load_sample_images().images:
        image = Image.fromarray(photo)  # 640 x 427
        for size in ((640, 427), (500, 375), (1280, 854), (1100, 733), (427, 640), (2000, 1333)):
            buffer = io.BytesIO()
            image.resize(size, Image.BICUBIC).save(buffer, format="JPEG", quality=90)
            out.append(buffer.getvalue())
    return out


@pytest.mark.parametrize("resolution, max_mean_abs, min_psnr", [(256, 4.0, 30.0), (128, 6.0, 28.0), (64, 6.0, 28.0)])
def test_fast_decode_stays_close_to_the_adm_crop(photos, resolution, max_mean_abs, min_psnr):
    drafted = 0
    for blob in photos:
        exact = load_and_crop(blob, resolution, 3, "exact").astype(np.float64)
        fast = load_and_crop(blob, resolution, 3, "fast").astype(np.float64)
        assert fast.shape == exact.shape == (resolution, resolution, 3)
        width, height = Image.open(io.BytesIO(blob)).size
        if min(width, height) < 2 * resolution:
            np.testing.assert_array_equal(fast, exact)  # no DCT scaling possible: the same pixels
            continue
        drafted += 1
        mse = ((fast - exact) ** 2).mean()
        psnr = 10 * np.log10(255.0**2 / max(mse, 1e-12))
        # The tolerance on a drafted photo: a few grey levels on average (libjpeg's scaled IDCT is a
        # slightly sharper low-pass than ADM's box halving), PSNR near 30 dB or above.
        assert np.abs(fast - exact).mean() < max_mean_abs and psnr > min_psnr, (width, height, resolution, psnr)
    assert drafted >= 4


def test_fast_decode_falls_back_for_other_formats_and_modes():
    picture = _picture(1, (600, 700))
    png = io.BytesIO()
    Image.fromarray(picture).save(png, format="PNG")
    np.testing.assert_array_equal(load_and_crop(png.getvalue(), 64, 3, "fast"), load_and_crop(png.getvalue(), 64, 3, "exact"))
    grey = _jpeg(picture[..., 0])
    assert load_and_crop(grey, 64, 1, "fast").shape == (64, 64, 1)
    with pytest.raises(ValueError, match="data.decode"):
        load_and_crop(grey, 64, 1, "quick")


# --- webdataset ----------------------------------------------------------------------------------


def test_brace_patterns_and_member_names():
    assert expand_braces("s3://b/train-{000..002}.tar") == ["s3://b/train-000.tar", "s3://b/train-001.tar", "s3://b/train-002.tar"]
    assert expand_braces("x-{a,b}-{1..2}.tar") == ["x-a-1.tar", "x-a-2.tar", "x-b-1.tar", "x-b-2.tar"]
    assert pattern_root("s3://b/imagenet/train-{000..002}.tar") == "s3://b/imagenet"
    with pytest.raises(ValueError, match="data.uri"):
        expand_braces("s3://b/train-{x}.tar")
    assert split_name("dir/n01_1.seg.png") == ("dir/n01_1", "seg.png")
    assert split_name("noext") == (None, None)
    assert parse_label({"cls": b" 7\n"}) == 7
    assert parse_label({"json": json.dumps({"label": 3}).encode()}) == 3
    assert parse_label({"json": json.dumps({"target": 3}).encode()}, "target") == 3
    assert parse_label({"jpg": b"x"}) is None
    with pytest.raises(ValueError, match="not an integer"):
        parse_label({"cls": b"cat"})


def _shard(samples):
    members = []
    for key, picture, label in samples:
        members += sample_members(key, _jpeg(picture), label)
    return tar_bytes(members)


def test_shards_are_scanned_and_decoded_with_the_bad_record_policy(tmp_path):
    good = [(f"n{i % 3:08d}_{i:05d}", _picture(i), i % 3) for i in range(6)]
    root = tmp_path / "wds"
    root.mkdir()
    (root / "train-000000.tar").write_bytes(_shard(good[:4]))
    # A shard with a corrupt image, a sample without a label and one labelled in .json only.
    (root / "train-000001.tar").write_bytes(tar_bytes([
        *sample_members("n00000000_00010", b"\xff\xd8 not a JPEG", 0),
        ("n00000001_00011.jpg", _jpeg(_picture(11))),
        ("n00000002_00012.jpg", _jpeg(_picture(12))), ("n00000002_00012.json", b'{"label": 2}'),
        *sample_members(good[4][0], _jpeg(good[4][1]), good[4][2]),
    ]))
    truncated = _shard(good[4:])
    cut = truncated.index(f"{good[5][0]}.jpg".encode()) + 600  # inside the second sample's image
    (root / "train-000002.tar").write_bytes(truncated[:cut])

    index = scan_shard(io.BytesIO(_shard(good[:4])))
    assert index.keys == [k for k, _, _ in good[:4]] and index.labels == [0, 1, 2, 0] and index.error is None
    assert [s["__key__"] for s in iter_samples(io.BytesIO(_shard(good[:2])))] == [good[0][0], good[1][0]]

    data = _data("data.format=webdataset", f"data.uri={root}", "data.resolution=16", "data.channels=3")
    with pytest.raises(DataFormatError, match=rf"data.on_error=raise: cannot read shard '.*train-000002.tar' after sample '{good[4][0]}'"):
        scan_dataset(_data("data.format=webdataset", f"data.uri={root}", "data.on_error=raise"))
    catalog = scan_dataset(data, num_classes=10)
    assert catalog.files == ["train-000000.tar", "train-000001.tar"] and catalog.rows == [4, 4]
    assert len(catalog.bad_files) == 1 and "train-000002.tar" in catalog.bad_files[0][0]
    assert catalog.file_labels[1] == [0, None, 2, 1] and catalog.num_classes_found == 3
    pattern = scan_dataset(_data("data.format=webdataset", f"data.uri={root}/train-{{000000..000001}}.tar"))
    assert pattern.files == catalog.files and pattern.uri == str(root)

    spec = records.decode_spec(data, catalog, num_classes=10, seed=0, epoch=0)
    rows = [s for name in catalog.files for s in iter_samples(io.BytesIO((root / name).read_bytes()))]
    batch = {"__key__": [r["__key__"] for r in rows], "__url__": [f"{root}/train-00000{i // 4}.tar" for i in range(8)],
             "jpg": [r.get("jpg") for r in rows], "cls": [r.get("cls") for r in rows], "json": [r.get("json") for r in rows]}
    out, bad = records.webdataset_records(batch, spec)
    assert out["image"].shape == (6, 3, 16, 16) and out["label"].tolist() == [0, 1, 2, 0, 2, 1]
    reasons = {b.source.split("(sample ")[1]: b.reason for b in bad}
    assert set(reasons) == {"'n00000000_00010')", "'n00000001_00011')"} and "no label" in reasons["'n00000001_00011')"]
    assert all("train-000001.tar" in b.source for b in bad)
    strict = records.DecodeSpec(**{**spec.to_dict(), "on_error": "raise"})
    with pytest.raises(BadInputError, match=r"train-000001.tar \(sample 'n00000001_00011'\).*no label"):
        records.webdataset_records(batch, strict)


# --- parquet: the Hugging Face layout ------------------------------------------------------------


def _hf_shard(path, labels, seed=0):
    image = pa.StructArray.from_arrays(
        [pa.array([_jpeg(_picture(seed + i)) for i in range(len(labels))], pa.binary()),
         pa.array([f"img_{seed + i}.JPEG" for i in range(len(labels))], pa.string())], names=["bytes", "path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": image, "label": pa.array(labels, pa.int64())}), path)


def test_hugging_face_layout_reads_the_train_split(tmp_path):
    root = tmp_path / "imagenet-1k"
    _hf_shard(root / "data" / "train-00000-of-00002.parquet", [0, 1, 2])
    _hf_shard(root / "data" / "train-00001-of-00002.parquet", [3, 4], seed=3)
    _hf_shard(root / "data" / "validation-00000-of-00001.parquet", [5])
    _hf_shard(root / "data" / "test-00000-of-00001.parquet", [-1])  # HF's test split has no labels
    (root / "README.md").write_text("dataset card")
    data = _data("data.format=parquet", f"data.uri={root}", "data.resolution=16", "data.channels=3")
    catalog = scan_dataset(data, num_classes=10)
    assert catalog.files == ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    assert catalog.num_images == 5 and catalog.num_classes_found == 5
    assert scan_dataset(_data("data.format=parquet", f"data.uri={root}", "data.split=validation")).num_images == 1
    with pytest.raises(DataFormatError, match="data.split.*train, validation"):
        scan_dataset(_data("data.format=parquet", f"data.uri={root}", "data.split=dev"))

    table = pq.read_table(root / catalog.files[0]).append_column("path", pa.array([f"{root}/{catalog.files[0]}"] * 3))
    bad_bytes = table.column("image").combine_chunks()
    broken = pa.StructArray.from_arrays([pa.array([b"garbage", *bad_bytes.field("bytes").to_pylist()[1:]], pa.binary()),
                                         bad_bytes.field("path")], names=["bytes", "path"])
    table = table.set_column(0, "image", broken)
    spec = records.decode_spec(data, catalog, num_classes=10, seed=0, epoch=0)
    out, bad = records.parquet_records(table, spec)
    assert out["label"].tolist() == [1, 2] and len(bad) == 1 and "img_0.JPEG" in bad[0].source


# --- the stored catalog --------------------------------------------------------------------------


def _folder(root, count, classes=3):
    for i in range(count):
        path = root / f"n{i % classes:08d}" / f"img_{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(_picture(i, (8, 8))))


def test_catalog_is_written_once_and_reused_while_the_prefix_is_unchanged(tmp_path, caplog):
    root = tmp_path / "folder"
    _folder(root, 9)
    data = _data("data.format=imagefolder", f"data.uri={root}")
    first = load_catalog(data, num_classes=10)
    assert first.status == "built" and (root / CATALOG_NAME).exists() and first.catalog.num_images == 9
    again = load_catalog(data, num_classes=10)
    assert again.status == "reused" and again.catalog.files == first.catalog.files
    assert again.catalog.class_to_label == first.catalog.class_to_label
    with pytest.raises(DataFormatError, match="model.num_classes=2"):
        load_catalog(data, num_classes=2)  # the stored catalog is checked like a scan
    _folder(root, 12, classes=4)  # a new class folder: rebuilt
    rebuilt = load_catalog(data, num_classes=10)
    assert rebuilt.status == "built" and "folders" in rebuilt.reason and rebuilt.catalog.num_images == 9 + 9  # img_0..8 moved in part
    assert load_catalog(_data("data.format=imagefolder", f"data.uri={root}", "data.catalog=rebuild")).status == "built"
    off = load_catalog(_data("data.format=imagefolder", f"data.uri={root}", "data.catalog=disabled"))
    assert off.status == "scanned" and off.location is None

    shards = tmp_path / "shards"
    _hf_shard(shards / "part-0.parquet", [0, 1])
    _hf_shard(shards / "part-1.parquet", [2])
    pdata = _data("data.format=parquet", f"data.uri={shards}", f"data.catalog_uri={tmp_path}/elsewhere/catalog.parquet")
    assert load_catalog(pdata).status == "built" and (tmp_path / "elsewhere" / "catalog.parquet").exists()
    reused = load_catalog(pdata)
    assert reused.status == "reused" and [list(v) for v in reused.catalog.file_labels] == [[0, 1], [2]]
    _hf_shard(shards / "part-2.parquet", [3, 4, 5])
    updated = load_catalog(pdata)
    assert updated.status == "updated" and "1 shard(s) new" in updated.reason and updated.catalog.num_images == 6


@pytest.mark.s3
def test_catalog_on_object_storage_and_a_read_only_place(s3_bucket, tmp_path, caplog):
    uri = f"{s3_bucket}/folder"
    for i in range(6):
        storage.write_bytes(f"{uri}/n{i % 2:08d}/img_{i}.JPEG", _jpeg(_picture(i, (8, 8))))
    data = _data("data.format=imagefolder", f"data.uri={uri}")
    assert load_catalog(data).status == "built" and storage.exists(f"{uri}/{CATALOG_NAME}")
    assert load_catalog(data).status == "reused"
    settings = _data("data.format=imagefolder", f"data.uri={uri}", f"data.class_index_uri={uri}/index.json")
    storage.write_text(f"{uri}/index.json", json.dumps({"n00000000": 1, "n00000001": 0}))
    swapped = load_catalog(settings)
    assert swapped.status == "built" and "class_index_uri" in swapped.reason
    assert swapped.catalog.class_to_label == {"n00000000": 1, "n00000001": 0}
    unwritable = _data("data.format=imagefolder", f"data.uri={uri}", "data.catalog_uri=s3://no-such-bucket-here/c.parquet")
    with caplog.at_level("WARNING"):
        assert load_catalog(unwritable).location is None
    assert "data.catalog_uri" in caplog.text


def test_data_wait_summary_skips_each_start_s_first_interval():
    from speed.train.components import data_wait_summary

    records = [
        {"step": 50, "resumed_from_step": 0, "step_time_s": 2.0, "data_wait_fraction": 0.9},  # start-up
        {"step": 100, "resumed_from_step": 0, "step_time_s": 1.0, "data_wait_fraction": 0.02},
        {"step": 150, "resumed_from_step": 0, "step_time_s": 1.0, "data_wait_fraction": 0.04},
        {"step": 200, "resumed_from_step": 150, "step_time_s": 3.0, "data_wait_fraction": 0.8},  # a resume's start
        {"step": 250, "resumed_from_step": 150, "step_time_s": 2.0, "data_wait_fraction": 0.06},
        {"eval": 1.0},
    ]
    summary = data_wait_summary(records)
    assert summary["intervals"] == 3
    assert summary["data_wait_fraction"] == pytest.approx((0.02 + 0.04 + 0.06 * 2) / 4)
    assert data_wait_summary(records[:1]) is None
