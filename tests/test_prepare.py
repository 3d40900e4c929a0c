"""Preparation jobs: digits written as an ImageNet-style dataset, and the VAE encode job
(round trip, resume without duplicates, refusal of mismatched reruns, clear VAE errors)."""

import io
import json
import posixpath

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ray_jobs import prepare
from ray_jobs.data import build_train_dataset, preflight_data
from speed import storage
from speed.config import load_config
from speed.data.catalog import DataFormatError, scan_dataset
from speed.data.latents import LATENT_META_NAME, sample_latents, shard_name
from speed.data.transforms import flip_mask, load_and_crop, to_model_tensor
from speed.data.vae import VAEError, load_vae, vae_identity


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_prepare_digits_writes_an_imagenet_style_folder(tmp_path, capsys):
    out = tmp_path / "digits"
    code = prepare.main(["-c", "configs/prepare/digits.yaml", f"prepare.output_uri={out}", "prepare.image_size=12",
                         "prepare.channels=1"])
    assert code == 0
    done = _last_json(capsys)
    assert done == {"event": "prepare_done", "task": "digits", "uri": str(out), "format": "imagefolder",
                    "images": 1797, "skipped": 0, "files": 1797, "class_index_uri": str(out / "class_index.json")}
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == [f"n{i:08d}" for i in range(10)]
    assert json.loads((out / "class_index.json").read_text()) == {f"n{i:08d}": i for i in range(10)}
    sample = next((out / "n00000003").iterdir())
    assert sample.suffix == ".JPEG" and load_and_crop(sample.read_bytes(), 12, 1).shape == (12, 12, 1)
    cfg = load_config("configs/digits/speed.yaml", ["data.format=imagefolder", f"data.uri={out}",
                                                    f"data.class_index_uri={out}/class_index.json"])
    catalog = scan_dataset(cfg.data, cfg.storage, num_classes=10)
    assert catalog.num_images == 1797 and catalog.num_classes_found == 10


def _shards(uri):
    return sorted(posixpath.basename(u) for u in storage.list_files(uri) if u.endswith(".parquet"))


def _tiny_vae_folder(path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), sample_size=32,
    )
    vae.save_pretrained(str(path), safe_serialization=True)
    return path


def test_vae_errors_name_vae_path(tmp_path):
    with pytest.raises(VAEError, match="vae.path: '.*nowhere' does not exist"):
        vae_identity(str(tmp_path / "nowhere"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 pretend pickle")
    with pytest.raises(VAEError, match="only pickle weights.*safetensors"):
        load_vae(str(pickled))
    (pickled / "config.json").unlink()
    with pytest.raises(VAEError, match="no config.json"):
        load_vae(str(pickled))


def _encode_args(source, out, vae_path, *extra):
    return ["-c", "configs/prepare/encode_imagenet.yaml", f"prepare.source_uri={source}", f"prepare.output_uri={out}",
            "prepare.resolution=32", "prepare.batch_size=8", "prepare.num_actors=1", "prepare.num_gpus_per_actor=0",
            "prepare.rows_per_shard=8", f"vae.path={vae_path}", "data.read_cpus=1", *extra]


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow  # the VAE actor imports diffusers
def test_encode_job_round_trips_and_resumes(ray_session, s3_bucket, tmp_path, capsys):
    local_vae = _tiny_vae_folder(tmp_path / "tiny-vae")
    vae_uri = f"{s3_bucket}/weights/tiny-vae"
    for item in local_vae.iterdir():
        storage.write_bytes(f"{vae_uri}/{item.name}", item.read_bytes())
    source = f"{s3_bucket}/source"
    prepare.write_digits(source, format="imagefolder", image_size=40, channels=3, indices=range(20))
    storage.write_bytes(f"{source}/n00000005/zero-bytes.JPEG", b"")
    out = f"{s3_bucket}/latents"

    # A missing VAE fails before any cluster work, naming vae.path.
    assert prepare.main(_encode_args(source, out, f"{s3_bucket}/weights/missing")) == 2
    assert "vae.path" in _last_json(capsys)["error"]

    assert prepare.main(_encode_args(source, out, vae_uri)) == 0
    done = _last_json(capsys)
    assert (done["event"], done["images"], done["skipped"], done["bad"], done["shards"]) == ("prepare_done", 20, 0, 1, 3)
    names = [shard_name(i, 3) for i in range(3)]
    assert _shards(out) == names
    meta = json.loads(storage.read_text(f"{out}/{LATENT_META_NAME}"))
    assert meta["complete"] and meta["latent_shape"] == [4, 4, 4] and meta["num_images"] == 20

    # Round trip: stored posteriors equal a direct encode (image and mirror image) and decode alike.
    vae = load_vae(str(local_vae))
    table = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/{names[0]}")))
    keys = table.column("key").to_pylist()
    assert keys == sorted(keys) and len(keys) == 8
    stored = np.stack([np.frombuffer(b, np.float16).reshape(2, 4, 4, 4) for b in table.column("latent_mean").to_pylist()])
    crops = np.stack([load_and_crop(storage.read_bytes(f"{source}/{k}"), 32, 3) for k in keys])
    images = to_model_tensor(crops)
    direct, _ = vae.encode(images)
    mirrored, _ = vae.encode(images.flip(-1))
    torch.testing.assert_close(torch.from_numpy(stored[:, 0]).float(), direct, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(torch.from_numpy(stored[:, 1]).float(), mirrored, atol=2e-3, rtol=2e-3)
    decoded = vae.decode(torch.from_numpy(stored[:, 0]).float() * vae.scale_factor)
    assert decoded.shape == (8, 3, 32, 32)
    torch.testing.assert_close(decoded, vae.decode(direct * vae.scale_factor), atol=2e-2, rtol=0)
    shard_one = storage.read_bytes(f"{out}/{names[1]}")

    # Resume: only the missing shard is written again, under the same name.
    storage.delete(f"{out}/{names[1]}")
    assert prepare.main(_encode_args(source, out, vae_uri)) == 0
    done = _last_json(capsys)
    assert (done["images"], done["skipped"], done["encoded"]) == (20, 13, 7)  # shard 1 holds the zero-byte file
    assert _shards(out) == names
    assert pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/{names[1]}"))).equals(pq.read_table(io.BytesIO(shard_one)))
    assert prepare.main(_encode_args(source, out, vae_uri)) == 0
    assert _last_json(capsys)["encoded"] == 0
    # A rerun that would mix in other latents is refused.
    assert prepare.main(_encode_args(source, out, vae_uri, "prepare.resolution=64")) == 2
    assert "prepare.output_uri" in _last_json(capsys)["error"]

    # Training reads one seeded orientation per image.
    cfg = load_config("configs/digits/speed.yaml", ["data.format=latents", f"data.uri={out}", "data.resolution=32",
                                                    "data.channels=4", "data.read_cpus=1"])
    assert preflight_data(cfg)["images"] == 20
    rows = build_train_dataset(cfg, seed=4, epoch=2).take_all()
    assert len(rows) == 20
    by_key = {}
    for name in names:
        shard = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/{name}")))
        for key, label, blob in zip(shard.column("key").to_pylist(), shard.column("label").to_pylist(),
                                    shard.column("latent_mean").to_pylist()):
            by_key[key] = (label, np.frombuffer(blob, np.float16).reshape(2, 4, 4, 4)[int(flip_mask([key], 4, 2)[0])])
    expected = list(by_key.values())
    for row in rows:
        assert row["latent_mean"].dtype == np.float16 and row["latent_mean"].shape == (4, 4, 4)
        assert row["latent_std"].dtype == np.float16 and (row["latent_std"] > 0).all()
        hit = next(i for i, (label, mean) in enumerate(expected)
                   if label == int(row["label"]) and np.array_equal(mean, row["latent_mean"]))
        expected.pop(hit)
    assert not expected
    batch_mean = torch.from_numpy(np.stack([r["latent_mean"] for r in rows[:4]]))
    batch_std = torch.from_numpy(np.stack([r["latent_std"] for r in rows[:4]]))
    assert sample_latents(batch_mean, batch_std, None, cfg.data.latent_scale).shape == (4, 4, 4, 4)

    with pytest.raises(ValueError, match="data.resolution=64"):
        preflight_data(load_config("configs/digits/speed.yaml", ["data.format=latents", f"data.uri={out}",
                                                                 "data.resolution=64", "data.channels=4"]))
    with pytest.raises(ValueError, match="data.channels=4"):
        preflight_data(load_config("configs/digits/speed.yaml", ["data.format=latents", f"data.uri={out}",
                                                                 "data.resolution=32", "data.channels=3"]))
    storage.delete(f"{out}/{names[2]}")
    with pytest.raises(DataFormatError, match="missing"):
        preflight_data(cfg)


def test_encode_fetch_reads_parquet_rows_across_row_groups(tmp_path):
    import pyarrow as pa

    from speed.data.transforms import encode_image

    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (12, 10, 3), dtype=np.uint8) for _ in range(10)]
    source = tmp_path / "source"
    source.mkdir()
    table = pa.table({"image": pa.array([encode_image(p, "PNG") for p in pictures], pa.binary()),
                      "label": pa.array(list(range(10)), pa.int64())})
    pq.write_table(table, source / "part-0.parquet", row_group_size=3)
    cfg = load_config("configs/prepare/encode_imagenet.yaml", [f"prepare.source_uri={source}", "prepare.source_format=parquet",
                                                               "prepare.resolution=8"])
    catalog = scan_dataset(prepare._source_data_config(cfg), cfg.storage)
    items = prepare._source_items(catalog)
    assert [item[0] for item in items[:2]] == ["part-0.parquet#0", "part-0.parquet#1"] and len(items) == 10
    chosen = [(*items[i], i, 0) for i in (4, 5, 9)] + [("part-0.parquet#99", 1, "part-0.parquet", 99, 10, 0)]
    spec = {"uri": str(source), "format": "parquet", "storage": cfg.storage, "resolution": 8, "on_error": "skip",
            "image_column": "image"}
    out = prepare._fetch_and_crop({"items": np.array([json.dumps(chosen)], dtype=object)}, spec=spec)
    assert out["ok"].tolist() == [True, True, True, False] and "part-0.parquet#99" in out["error"][3]
    for position, row in enumerate((4, 5, 9)):
        np.testing.assert_array_equal(out["image"][position], load_and_crop(encode_image(pictures[row], "PNG"), 8, 3))
    assert out["label"].tolist() == [4, 5, 9, 1] and out["shard"].tolist() == [0, 0, 0, 0]


def test_encode_keeps_clean_images_beside_the_latents_when_asked(tmp_path):
    """prepare.keep_images=true: the encode stages (run here without Ray) store the clean center
    crop, unflipped, at prepare.image_resolution; the reader flips it exactly with the latent."""
    from PIL import Image

    from speed.data import records
    from speed.data.latents import CLEAN_IMAGE_FIELD, LATENT_IMAGE_COLUMN
    from speed.data.transforms import decode_image

    source = tmp_path / "source"
    prepare.write_digits(str(source), format="imagefolder", image_size=40, channels=3, indices=range(6))
    vae_folder = _tiny_vae_folder(tmp_path / "tiny-vae")
    cfg = load_config("configs/prepare/encode_imagenet.yaml", [
        f"prepare.source_uri={source}", "prepare.resolution=32", "prepare.keep_images=true",
        "prepare.image_resolution=16", f"vae.path={vae_folder}"])
    images = prepare._stored_images(cfg.prepare)
    assert images == {"format": "png", "resolution": 16, "channels": 3, "orientation": "original"}
    assert prepare._stored_images(load_config("configs/prepare/encode_imagenet.yaml", []).prepare) is None
    with pytest.raises(prepare.ConfigError, match="prepare.image_resolution=64"):
        prepare._stored_images(load_config("configs/prepare/encode_imagenet.yaml", [
            "prepare.resolution=32", "prepare.keep_images=true", "prepare.image_resolution=64"]).prepare)

    catalog = scan_dataset(prepare._source_data_config(cfg), cfg.storage)
    items = prepare._source_items(catalog)
    chosen = [(*items[i], i, 0) for i in range(6)]
    spec = {"uri": str(source), "format": "imagefolder", "storage": cfg.storage, "resolution": 32, "on_error": "skip",
            "image_column": "image", "keep_images": images}
    fetched = prepare._fetch_and_crop({"items": np.array([json.dumps(chosen)], dtype=object)}, spec=spec)
    encoded = prepare.VAEEncoder(str(vae_folder), cfg.storage, "fp32", 0.18215, use_gpu=False)(fetched)
    out = tmp_path / "latents"
    out.mkdir()
    assert prepare._write_shard(str(out), 0, 1, [encoded], cfg.storage) == 6
    table = pq.read_table(out / shard_name(0, 1))
    assert LATENT_IMAGE_COLUMN in table.column_names
    for crop, blob in zip(fetched["image"], table.column(LATENT_IMAGE_COLUMN).to_pylist()):
        expected = np.asarray(Image.fromarray(crop).resize((16, 16), resample=Image.BICUBIC))
        np.testing.assert_array_equal(decode_image(blob, 3), expected)  # PNG: lossless

    # The reader: the flipped latent comes with the flipped image, the original with the original.
    keys = table.column("key").to_pylist()
    stored = np.stack([np.frombuffer(b, np.float16).reshape(2, 4, 4, 4) for b in table.column("latent_mean").to_pylist()])
    batch = {name: np.asarray(table.column(name).to_pylist(), dtype=object) for name in table.column_names}
    seed, epoch = next((s, e) for s in range(50) for e in range(3) if 0 < flip_mask(keys, s, e).sum() < 6)
    read_spec = records.DecodeSpec(format="latents", uri=str(out), root=str(out), resolution=32, channels=4,
                                   random_flip=True, seed=seed, epoch=epoch, latent_shape=(4, 4, 4),
                                   image_resolution=16)
    rows = records.latent_records(batch, read_spec)
    for i, (flipped, blob) in enumerate(zip(flip_mask(keys, seed, epoch), table.column(LATENT_IMAGE_COLUMN).to_pylist())):
        np.testing.assert_array_equal(rows["latent_mean"][i], stored[i, int(flipped)])
        picture = decode_image(blob, 3)
        np.testing.assert_array_equal(rows[CLEAN_IMAGE_FIELD][i],
                                      (picture[:, ::-1] if flipped else picture).transpose(2, 0, 1))

    # A rerun with other image settings would mix shards with and without images: refused.
    planned = {"format": "speed-latents", "version": 1, "latent_shape": [4, 4, 4], "resolution": 32,
               "rows_per_shard": 1024, "num_shards": 1, "vae_dtype": "fp32", "vae": {"weights_sha256": "x"},
               "source": {"fingerprint": "y"}, "images": images}
    with pytest.raises(ValueError, match="prepare.keep_images"):
        prepare._check_resume({**planned, "images": None}, planned, str(out))
    prepare._check_resume(dict(planned), planned, str(out))


@pytest.mark.ray
@pytest.mark.slow  # the VAE actor imports diffusers
def test_encode_job_with_images_feeds_repa_rows_flipped_with_their_latent(ray_session, tmp_path, capsys):
    """End to end: the encode job with prepare.keep_images=true, then the training pipeline with
    REPA on, whose rows carry the stored image flipped exactly when the latent is the flipped one."""
    from speed.data.latents import CLEAN_IMAGE_FIELD, LATENT_IMAGE_COLUMN
    from speed.data.transforms import decode_image

    vae = _tiny_vae_folder(tmp_path / "tiny-vae")
    source, out = tmp_path / "source", tmp_path / "latents"
    prepare.write_digits(str(source), format="imagefolder", image_size=40, channels=3, indices=range(12))
    assert prepare.main(_encode_args(source, out, vae, "prepare.keep_images=true")) == 0
    assert _last_json(capsys)["images"] == 12
    meta = json.loads((out / LATENT_META_NAME).read_text())
    assert meta["images"]["resolution"] == 32 and meta["images"]["format"] == "png"

    stored, keys = {}, []  # latent bytes of either orientation -> (orientation, image)
    for name in _shards(str(out)):
        shard = pq.read_table(out / name)
        keys += shard.column("key").to_pylist()
        for blob, picture in zip(shard.column("latent_mean").to_pylist(), shard.column(LATENT_IMAGE_COLUMN).to_pylist()):
            both = np.frombuffer(blob, np.float16).reshape(2, 4, 4, 4)
            for orientation in (0, 1):
                stored[both[orientation].tobytes()] = (orientation, decode_image(picture, 3))
    repa = ["repa.encoder=vit_tiny_patch16_224", "repa.weights_uri=unused-by-the-data-plane"]
    cfg = load_config("configs/digits/speed.yaml", ["data.format=latents", f"data.uri={out}", "data.resolution=32",
                                                    "data.channels=4", "data.read_cpus=1", *repa])
    seed = next(s for s in range(100) if 0 < flip_mask(keys, s, 0).sum() < len(keys))  # both orientations occur
    rows = build_train_dataset(cfg, seed=seed, epoch=0).take_all()
    orientations = set()
    for row in rows:
        orientation, picture = stored[np.asarray(row["latent_mean"]).tobytes()]
        orientations.add(orientation)
        expected = picture[:, ::-1] if orientation else picture
        np.testing.assert_array_equal(row[CLEAN_IMAGE_FIELD], expected.transpose(2, 0, 1))
    assert len(rows) == 12 and orientations == {0, 1}
