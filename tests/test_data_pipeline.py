"""Ray Data pipelines against the S3 test server: imagefolder and Parquet datasets written from
digits, read back with the right counts, labels, shapes, dtype, range, flips and resume; bad
inputs counted or raised as data.on_error says; layout problems caught by the preflight."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ray_jobs import prepare
from ray_jobs.data import (
    bad_input_report,
    build_train_dataset,
    data_error,
    dataset_catalog,
    epochs_to_cover,
    dataset_size,
    ingest_options,
    num_classes_found,
    preflight_data,
)
from speed import storage
from speed.config import load_config
from speed.data.catalog import DataFormatError, plan_epoch
from speed.data.transforms import flip_mask, load_and_crop, to_model_array

pytestmark = [pytest.mark.ray, pytest.mark.s3]


def _cfg(*overrides):
    # Whole-CPU read tasks: on the small test machine, fewer concurrent tasks reuse Ray's
    # prestarted workers instead of starting new ones.
    return load_config("configs/digits/speed.yaml", ["data.read_cpus=1", *overrides])


def _jpeg(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def test_imagefolder_streams_from_s3_with_seeded_flips_and_resume(ray_session, s3_bucket):
    uri = f"{s3_bucket}/digits-imagefolder"
    prepare.write_digits(uri, format="imagefolder", image_size=16, channels=3, indices=range(40))
    cfg = _cfg("data.format=imagefolder", f"data.uri={uri}", "data.resolution=16", "data.channels=3",
               f"data.class_index_uri={uri}/class_index.json")
    summary = preflight_data(cfg)
    assert summary["images"] == 40 and summary["files"] == 40 and summary["classes"] == 10
    assert dataset_size(cfg) == 40 and num_classes_found(cfg) == 10

    seed, epoch, skip = 5, 1, 10
    plan = plan_epoch(dataset_catalog(cfg), seed, epoch, skip)
    assert len(plan.files) == 30 and plan.images_skipped == 10
    flips = flip_mask(plan.files, seed, epoch)
    assert 0 < flips.sum() < 30
    # The expected rows, computed from the stored bytes without the pipeline.
    expected = []
    for relative, flip in zip(plan.files, flips):
        crop = load_and_crop(storage.read_bytes(storage.join(uri, relative)), 16, 3)
        expected.append((int(relative[1:9]), to_model_array(crop[None], np.array([flip]))[0]))

    rows = build_train_dataset(cfg, seed=seed, epoch=epoch, skip_images=skip).take_all()
    assert len(rows) == 30
    for row in rows:
        assert row["image"].shape == (3, 16, 16) and row["image"].dtype == np.float32
        assert row["image"].min() >= -1.0 and row["image"].max() <= 1.0
        assert isinstance(row["label"], (int, np.integer))
    unmatched = list(expected)
    for row in rows:
        hit = next(i for i, (label, image) in enumerate(unmatched)
                   if label == int(row["label"]) and np.array_equal(image, row["image"]))
        unmatched.pop(hit)
    assert not unmatched
    assert ingest_options().preserve_order


def test_parquet_from_prepare_job_streams_into_torch_batches(ray_session, s3_bucket, capsys):
    uri = f"{s3_bucket}/digits-parquet"
    code = prepare.main(["-c", "configs/prepare/digits.yaml", f"prepare.output_uri={uri}", "prepare.format=parquet",
                         "prepare.image_size=8", "prepare.channels=1", "prepare.num_shards=3"])
    assert code == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["event"] == "prepare_done" and done["images"] == 1797 and done["uri"] == uri
    assert storage.exists(f"{uri}/class_index.json")

    cfg = _cfg("data.format=parquet", f"data.uri={uri}", "data.resolution=8", "data.channels=1")
    assert preflight_data(cfg)["images"] == 1797 and num_classes_found(cfg) == 10
    # A resumed run with 700 images of epoch 3 consumed, streaming that epoch's rest and epoch 4:
    # resume skips whole shards only (599 rows each), so just epoch 3's first shard is dropped.
    assert epochs_to_cover(3 * 1797 + 700, 1797 + 1000, 1797) == 2
    dataset = build_train_dataset(cfg, seed=0, epoch=3, skip_images=700, num_epochs=2)
    labels, count = [], 0
    for batch in dataset.iter_torch_batches(batch_size=256, local_shuffle_buffer_size=cfg.data.shuffle_buffer,
                                            prefetch_batches=cfg.data.prefetch_batches):
        assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (1, 8, 8)
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        labels.append(batch["label"])
        count += len(batch["label"])
    catalog = dataset_catalog(cfg)
    dropped = plan_epoch(catalog, 0, 3).files[0]
    assert plan_epoch(catalog, 0, 3, skip_images=700).images_skipped == 599
    dropped_labels = np.bincount(catalog.file_labels[catalog.files.index(dropped)], minlength=10)
    from sklearn.datasets import load_digits

    assert count == 2 * 1797 - 599
    expected = 2 * np.bincount(load_digits().target) - dropped_labels
    assert torch.cat(labels).bincount().tolist() == expected.tolist()


def test_bad_inputs_are_counted_and_skipped(ray_session, s3_bucket):
    uri = f"{s3_bucket}/bad-imagefolder"
    prepare.write_digits(uri, format="imagefolder", image_size=16, channels=3, indices=range(10))
    good = _jpeg(np.full((20, 24, 3), 120, np.uint8))
    cmyk = io.BytesIO()
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(cmyk, format="JPEG")
    storage.write_bytes(f"{uri}/n00000001/truncated.JPEG", good[: len(good) // 2])
    storage.write_bytes(f"{uri}/n00000002/empty.jpeg", b"")
    storage.write_bytes(f"{uri}/n00000003/notes.txt", b"not an image")
    storage.write_bytes(f"{uri}/n00000004/cmyk.jpg", cmyk.getvalue())

    # Parquet: a plain binary column, custom column names, a garbage row and null cells.
    table_uri = f"{s3_bucket}/bad-parquet"
    buffer = io.BytesIO()
    pq.write_table(pa.table({
        "img": pa.array([good] * 4 + [b"garbage", None, good], type=pa.binary()),
        "y": pa.array([0, 1, 2, 3, 4, 5, None], type=pa.int64()),
    }), buffer)
    storage.write_bytes(f"{table_uri}/shard-0.parquet", buffer.getvalue())

    bad_input_report(reset=True)
    cfg = _cfg("data.format=imagefolder", f"data.uri={uri}", "data.resolution=16", "data.channels=3")
    rows = build_train_dataset(cfg, seed=0).take_all()
    assert len(rows) == 11  # 10 digits + the CMYK photo, converted to RGB
    report = bad_input_report(reset=True)
    assert report["bad_inputs"] == 3
    sources = " ".join(example["source"] for example in report["examples"])
    for name in ("truncated.JPEG", "empty.jpeg", "notes.txt"):
        assert f"{uri}/" in sources and name in sources

    pcfg = _cfg("data.format=parquet", f"data.uri={table_uri}", "data.resolution=16", "data.channels=1",
                "data.image_column=img", "data.label_column=y", "data.max_logged_errors=1")
    rows = build_train_dataset(pcfg, seed=0).take_all()
    assert sorted(int(r["label"]) for r in rows) == [0, 1, 2, 3]
    report = bad_input_report(reset=True)
    assert report["bad_inputs"] == 3 and len(report["examples"]) == 1
    assert "shard-0.parquet" in report["examples"][0]["source"]


def test_on_error_raise_names_the_file(ray_session, s3_bucket):
    uri = f"{s3_bucket}/raise-imagefolder"
    prepare.write_digits(uri, format="imagefolder", image_size=8, channels=1, indices=range(4))
    storage.write_bytes(f"{uri}/n00000000/broken.JPEG", b"\xff\xd8\xff\xe0 definitely not a JPEG")
    cfg = _cfg("data.format=imagefolder", f"data.uri={uri}", "data.on_error=raise")
    with pytest.raises(Exception) as failure:
        build_train_dataset(cfg, seed=0).take_all()
    assert f"{uri}/n00000000/broken.JPEG" in str(failure.value)
    cause = data_error(failure.value)  # the one-line message behind Ray Data's wrapped traceback
    assert cause is not None and str(cause).startswith(f"data.on_error=raise: cannot decode '{uri}/n00000000/broken.JPEG'")
    assert data_error(RuntimeError("unrelated")) is None


def test_preflight_catches_layout_problems(s3_bucket, tmp_path):
    with pytest.raises(storage.StorageError, match="nothing under"):
        preflight_data(_cfg("data.format=imagefolder", f"data.uri={s3_bucket}/nothing-here"))

    uri = f"{s3_bucket}/layout"
    prepare.write_digits(uri, format="imagefolder", image_size=8, channels=1, indices=range(20))
    base = ("data.format=imagefolder", f"data.uri={uri}")
    with pytest.raises(DataFormatError, match=r"label 9, outside \[0, model.num_classes=5\)"):
        preflight_data(_cfg(*base, "model.num_classes=5", "sample.classes=[0,1,2,3,4]"))
    storage.write_text(f"{uri}/partial_index.json", json.dumps({f"n{i:08d}": i for i in range(9)}))
    with pytest.raises(DataFormatError, match="n00000009.*not in data.class_index_uri"):
        preflight_data(_cfg(*base, f"data.class_index_uri={uri}/partial_index.json"))
    storage.write_text(f"{uri}/dupe_index.json", json.dumps({f"n{i:08d}": i % 9 for i in range(10)}))
    with pytest.raises(DataFormatError, match="both"):
        preflight_data(_cfg(*base, f"data.class_index_uri={uri}/dupe_index.json"))
    with pytest.raises(storage.StorageError, match="data.class_index_uri"):
        preflight_data(_cfg(*base, f"data.class_index_uri={uri}/missing.json"))
    storage.write_bytes(f"{uri}/n00000000/deeper/x.JPEG", b"x")
    with pytest.raises(DataFormatError, match="nested below the class folders"):
        preflight_data(_cfg(*base))

    local = tmp_path / "imagefolder"
    (local / "n00000000").mkdir(parents=True)
    (local / "n00000000" / "a.JPEG").write_bytes(_jpeg(np.zeros((8, 8, 3), np.uint8)))
    (local / "n00000001").mkdir()
    with pytest.raises(DataFormatError, match="n00000001.*empty"):
        preflight_data(_cfg("data.format=imagefolder", f"data.uri={local}"))

    table_uri = f"{s3_bucket}/no-label-column"
    buffer = io.BytesIO()
    pq.write_table(pa.table({"image": pa.array([b"x"], type=pa.binary()), "target": pa.array([1])}), buffer)
    storage.write_bytes(f"{table_uri}/part-0.parquet", buffer.getvalue())
    with pytest.raises(DataFormatError, match="data.label_column.*no column 'label'.*target"):
        preflight_data(_cfg("data.format=parquet", f"data.uri={table_uri}"))
    with pytest.raises(DataFormatError, match="raise.*cannot read Parquet"):
        storage.write_bytes(f"{table_uri}/part-1.parquet", b"PAR1 truncated")
        preflight_data(_cfg("data.format=parquet", f"data.uri={table_uri}", "data.label_column=target",
                            "data.on_error=raise"))
    summary = preflight_data(_cfg("data.format=parquet", f"data.uri={table_uri}", "data.label_column=target"))
    assert summary["bad_files"] == 1 and summary["images"] == 1

    assert preflight_data(_cfg())["images"] == 1797  # digits: nothing to check remotely
    with pytest.raises(ValueError, match="digits is served in memory"):
        build_train_dataset(_cfg(), seed=0)


def test_webdataset_and_hugging_face_parquet_stream_with_bad_records_counted(ray_session, s3_bucket):
    from speed.data.webdataset import sample_members, tar_bytes

    uri = f"{s3_bucket}/digits-wds"
    prepare.write_digits(uri, format="webdataset", image_size=16, channels=3, num_shards=3, indices=range(30))
    storage.write_bytes(f"{uri}/train-000003.tar", tar_bytes([
        *sample_members("n00000001_bad", b"\xff\xd8 not a JPEG", 1),
        ("n00000002_nolabel.jpg", _jpeg(np.full((16, 16, 3), 9, np.uint8))),
    ]))
    cfg = _cfg("data.format=webdataset", f"data.uri={uri}", "data.resolution=16", "data.channels=3")
    summary = preflight_data(cfg)
    assert summary["images"] == 32 and summary["files"] == 4 and summary["catalog"] == "built"
    assert preflight_data(cfg)["catalog"] == "reused"
    bad_input_report(reset=True)
    dataset = build_train_dataset(cfg, seed=1, epoch=0, skip_images=0)
    labels = []
    for batch in dataset.iter_torch_batches(batch_size=8, local_shuffle_buffer_size=cfg.data.shuffle_buffer):
        assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (3, 16, 16)
        labels.append(batch["label"])
    from sklearn.datasets import load_digits

    assert sorted(torch.cat(labels).tolist()) == sorted(load_digits().target[:30].tolist())
    report = bad_input_report(reset=True)
    assert report["bad_inputs"] == 2
    assert {e["source"].split("(sample ")[1] for e in report["examples"]} == {"'n00000001_bad')", "'n00000002_nolabel')"}
    strict = _cfg("data.format=webdataset", f"data.uri={uri}/train-{{000000..000003}}.tar", "data.resolution=16",
                  "data.channels=3", "data.on_error=raise")
    with pytest.raises(Exception) as failure:
        build_train_dataset(strict, seed=1).take_all()
    assert "cannot decode '" + f"{uri}/train-000003.tar (sample 'n0000000" in str(data_error(failure.value))

    # The Hugging Face layout, converted from the shards by the prepare job (resumably).
    hf = f"{s3_bucket}/digits-hf"
    args = ["-c", "configs/prepare/convert.yaml", f"prepare.source_uri={uri}", "prepare.source_format=webdataset",
            f"prepare.output_uri={hf}/data", "prepare.format=parquet", "prepare.rows_per_shard=12", "data.read_cpus=1"]
    assert prepare.main(args) == 0
    names = sorted(u.rsplit("/", 1)[1] for u in storage.list_files(f"{hf}/data"))
    assert names == [f"part-{i:05d}-of-00003.parquet" for i in range(3)]
    for i, name in enumerate(names):  # renamed as Hugging Face names its train split
        storage.write_bytes(f"{hf}/data/train-{i:05d}-of-00003.parquet", storage.read_bytes(f"{hf}/data/{name}"))
        storage.delete(f"{hf}/data/{name}")
    hcfg = _cfg("data.format=parquet", f"data.uri={hf}", "data.resolution=16", "data.channels=3")
    assert preflight_data(hcfg)["images"] == 30
    rows = build_train_dataset(hcfg, seed=0).take_all()
    assert sorted(int(r["label"]) for r in rows) == sorted(load_digits().target[:30].tolist())


def test_prepare_converts_between_formats_and_resumes(ray_session, s3_bucket, capsys):
    source = f"{s3_bucket}/conv-folder"
    prepare.write_digits(source, format="imagefolder", image_size=12, channels=3, indices=range(20))
    out = f"{s3_bucket}/conv-wds"
    args = ["-c", "configs/prepare/convert.yaml", f"prepare.source_uri={source}", "prepare.source_format=imagefolder",
            f"prepare.output_uri={out}", "prepare.format=webdataset", "prepare.rows_per_shard=8", "data.read_cpus=1"]
    assert prepare.main(args) == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (done["images"], done["written"], done["skipped"]) == (20, 20, 0)
    first = storage.read_bytes(f"{out}/train-000001.tar")
    storage.delete(f"{out}/train-000001.tar")
    assert prepare.main(args) == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (done["written"], done["skipped"]) == (8, 12)
    assert storage.read_bytes(f"{out}/train-000001.tar") == first  # the same bytes: deterministic shards
    back = f"{s3_bucket}/conv-back"
    assert prepare.main(["-c", "configs/prepare/convert.yaml", f"prepare.source_uri={out}", "prepare.source_format=webdataset",
                         f"prepare.output_uri={back}", "prepare.format=imagefolder", "data.read_cpus=1"]) == 0
    for relative in ("n00000003/n00000003_00003.JPEG", "n00000007/n00000007_00017.JPEG"):
        assert storage.read_bytes(f"{back}/{relative}") == storage.read_bytes(f"{source}/{relative}")
