"""Dataset preparation: python -m ray_jobs.prepare -c CONFIG [key=value ...].

prepare.task=digits (configs/prepare/digits.yaml)
    Writes scikit-learn's digits to ``prepare.output_uri`` as an ImageNet-style image folder
    (``n00000000/ .. n00000009/``, JPEG) or as Parquet shards (column ``image`` a struct {bytes,
    path} of PNG bytes, column ``label``), upscaled to ``prepare.image_size`` with
    ``prepare.channels`` channels, plus ``class_index.json`` ({wnid: label}) beside the images. It
    exercises the ImageNet code path anywhere, without ImageNet.

    ``prepare.format=webdataset`` writes tar shards (``train-000000.tar``: ``<key>.jpg``,
    ``<key>.cls``, ``<key>.json``).

prepare.task=convert (configs/prepare/convert.yaml)
    Rewrites the imagefolder, Parquet or WebDataset dataset at ``prepare.source_uri`` in
    ``prepare.format`` at ``prepare.output_uri``, copying the encoded image bytes unchanged
    (``prepare.rows_per_shard`` images per Parquet or tar shard). Each shard (or image file) is one
    atomic write and a rerun skips those that exist, so an interrupted conversion resumes. Bad
    source records follow ``data.on_error``.

prepare.task=encode (configs/prepare/encode_imagenet.yaml)
    Encodes the imagefolder, Parquet or WebDataset dataset at ``prepare.source_uri`` with the AutoencoderKL at
    ``vae.path`` into ``latents`` shards at ``prepare.output_uri`` (layout: speed/data/latents.py).
    Ray Data reads and preprocesses the images in CPU tasks and encodes each image and its mirror
    image in a pool of ``prepare.num_actors`` actors (``prepare.num_gpus_per_actor`` GPUs each;
    CPU when 0). Source items are assigned to shards by their sorted order, so shard i always holds
    the same items; each shard is written whole with one atomic write. A rerun skips the shards
    that exist, so an interrupted job resumes without duplicates; _meta.json records the VAE and
    the source so that a rerun with different ones is refused.

    ``prepare.keep_images=true`` also stores each image's clean center crop (unflipped; PNG or JPEG
    per ``prepare.image_format``, ``prepare.image_resolution`` px, default ``prepare.resolution``)
    in an ``image`` column beside its latents, for REPA on latents: the training reader flips it
    exactly when it picks the flipped latent.

Both print progress on stderr and end with one JSON line on stdout:
``{"event": "prepare_done", "uri": ..., "images": N, "skipped": K, ...}``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import posixpath
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ray_jobs.common import emit, init_ray, load_job_config, run_main
from speed import storage
from speed.config.schema import Config, ConfigError, DataConfig, StorageConfig
from speed.data.batches import BadInputError
from speed.data.catalog import DatasetCatalog, read_latent_meta, scan_dataset
from speed.data.digits import load_digits
from speed.data.latents import (
    LATENT_FORMAT,
    LATENT_FORMAT_VERSION,
    LATENT_META_NAME,
    ORIENTATIONS,
    VAE_DOWNSAMPLE,
    latent_shard_table,
    shard_name,
    table_to_parquet_bytes,
)
from speed.data.transforms import encode_image, load_and_crop, open_image, to_model_tensor, to_uint8_images

log = logging.getLogger("speed.prepare")

DEFAULT_CONFIG = "configs/prepare/digits.yaml"
CLASS_INDEX_NAME = "class_index.json"
UPLOAD_THREADS = 16
FETCH_CHUNK = 32  # source items fetched and decoded per Ray task call
FETCH_THREADS = 8  # parallel object reads inside one fetch call (object stores reward concurrency)


def digits_wnid(label: int) -> str:
    """An ImageNet-like folder name for a digit class: n00000000 .. n00000009."""
    return f"n{label:08d}"


def _require(value: Optional[str], key: str, example: str) -> str:
    if not value:
        raise ConfigError(f"{key} is empty; set it to a local folder or s3://bucket/prefix, e.g. {key}={example}")
    return value


def _progress(total: int, unit: str, desc: str) -> tqdm:
    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


# --- digits --------------------------------------------------------------------------------------


def write_digits(
    out: str,
    *,
    format: str,
    image_size: int,
    channels: int,
    num_shards: int = 4,
    storage_cfg: Optional[StorageConfig] = None,
    indices: Optional[Sequence[int]] = None,
) -> Dict[str, Any]:
    """Write digits (all, or those at ``indices``) to ``out`` as imagefolder or Parquet shards,
    plus class_index.json; returns what was written."""
    images, labels = load_digits(image_size, channels)
    pixels = to_uint8_images(images)  # [N, H, W, C]
    labels = labels.numpy()
    class_index = {digits_wnid(label): label for label in range(int(labels.max()) + 1)}
    chosen = np.arange(len(pixels)) if indices is None else np.asarray(indices, dtype=np.int64)

    if format == "imagefolder":
        def write_one(i: int) -> None:
            wnid = digits_wnid(int(labels[i]))
            storage.write_bytes(storage.join(out, wnid, f"{wnid}_{i:05d}.JPEG"), encode_image(pixels[i], "JPEG"), storage_cfg)

        with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool, _progress(len(chosen), "img", "digits") as bar:
            for _ in pool.map(write_one, chosen.tolist()):
                bar.update(1)
        files = len(chosen)
    elif format == "parquet":
        groups = [g for g in np.array_split(chosen, num_shards) if g.size]

        def write_shard(shard: int) -> None:
            rows = groups[shard]
            names = [f"{digits_wnid(int(labels[i]))}_{i:05d}.png" for i in rows]
            image = pa.StructArray.from_arrays(
                [pa.array([encode_image(pixels[i], "PNG") for i in rows], type=pa.binary()), pa.array(names, type=pa.string())],
                names=["bytes", "path"],
            )
            table = pa.table({"image": image, "label": pa.array(labels[rows].astype(np.int64))})
            buffer = io.BytesIO()
            pq.write_table(table, buffer)
            storage.write_bytes(storage.join(out, f"part-{shard:05d}-of-{len(groups):05d}.parquet"), buffer.getvalue(), storage_cfg)

        with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool, _progress(len(groups), "shard", "digits") as bar:
            for _ in pool.map(write_shard, range(len(groups))):
                bar.update(1)
        files = len(groups)
    elif format == "webdataset":
        from speed.data.webdataset import sample_members, tar_bytes

        groups = [g for g in np.array_split(chosen, num_shards) if g.size]

        def write_tar(shard: int) -> None:
            members = []
            for i in groups[shard]:
                wnid = digits_wnid(int(labels[i]))
                members += sample_members(f"{wnid}_{i:05d}", encode_image(pixels[i], "JPEG"), int(labels[i]), "jpg",
                                          {"wnid": wnid})
            storage.write_bytes(storage.join(out, f"train-{shard:06d}.tar"), tar_bytes(members), storage_cfg)

        with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool, _progress(len(groups), "shard", "digits") as bar:
            for _ in pool.map(write_tar, range(len(groups))):
                bar.update(1)
        files = len(groups)
    else:
        raise ConfigError(f"prepare.format={format!r} is not valid; choose imagefolder, parquet or webdataset")
    index_uri = storage.join(out, CLASS_INDEX_NAME)
    storage.write_text(index_uri, json.dumps(class_index, indent=1, sort_keys=True), storage_cfg)
    return {"uri": out, "format": format, "images": int(len(chosen)), "skipped": 0, "files": files,
            "class_index_uri": index_uri}


def prepare_digits(cfg: Config) -> Dict[str, Any]:
    p = cfg.prepare
    out = _require(p.output_uri, "prepare.output_uri", "s3://my-bucket/digits-imagefolder")
    storage.preflight(out, cfg.storage, key="prepare.output_uri", must_exist=False, writable=True)
    return write_digits(out, format=p.format, image_size=p.image_size, channels=p.channels,
                        num_shards=p.num_shards, storage_cfg=cfg.storage)


# --- encode: planning ----------------------------------------------------------------------------


def _source_data_config(cfg: Config) -> DataConfig:
    """The source dataset, read with the data section's column names, class index and error policy."""
    p = cfg.prepare
    return DataConfig(
        format=p.source_format,
        uri=_require(p.source_uri, "prepare.source_uri", "s3://my-bucket/imagenet/train"),
        resolution=p.resolution,
        channels=3,
        on_error=cfg.data.on_error,
        class_index_uri=cfg.data.class_index_uri,
        image_column=cfg.data.image_column,
        label_column=cfg.data.label_column,
        max_logged_errors=cfg.data.max_logged_errors,
        split=cfg.data.split,
    )


def _source_items(catalog: DatasetCatalog) -> List[Tuple[str, int, str, int]]:
    """(key, label, file, row) for every source image, in a deterministic order (row -1: whole file).

    Labels that are missing in a Parquet or WebDataset source become -1 and are reported as bad
    items. WebDataset keys are ``shard.tar#sample-key``.
    """
    if catalog.format == "imagefolder":
        return [(f, catalog.class_to_label[f.split("/", 1)[0]], f, -1) for f in catalog.files]
    items = []
    keys = catalog.file_keys if catalog.format == "webdataset" else None
    for index, (relative, labels) in enumerate(zip(catalog.files, catalog.file_labels or [])):
        values = labels.tolist() if isinstance(labels, np.ndarray) else list(labels)
        for row, label in enumerate(values):
            label = -1 if label is None or (isinstance(label, float) and math.isnan(label)) else int(label)
            name = f"{relative}#{keys[index][row]}" if keys else f"{relative}#{row}"
            items.append((name, label, relative, row))
    return items


def _fingerprint(items: Sequence[Tuple[str, int, str, int]]) -> str:
    digest = hashlib.sha256()
    for key, label, _, _ in items:
        digest.update(f"{key}\t{label}\n".encode("utf-8"))
    return digest.hexdigest()


_RESUME_FIELDS = (
    ("latent_shape", "the latent shape"),
    ("resolution", "prepare.resolution"),
    ("rows_per_shard", "prepare.rows_per_shard"),
    ("num_shards", "the shard count"),
    ("vae_dtype", "vae.dtype"),
    ("images", "the stored images (prepare.keep_images, prepare.image_resolution, prepare.image_format)"),
)


def _check_resume(existing: Dict[str, Any], planned: Dict[str, Any], out: str) -> None:
    """Refuse to add shards to latents made from another VAE, source or layout."""
    problems = []
    if existing.get("format") != LATENT_FORMAT or existing.get("version") != LATENT_FORMAT_VERSION:
        problems.append(f"format {existing.get('format')!r} v{existing.get('version')!r}")
    for field, name in _RESUME_FIELDS:
        if existing.get(field) != planned[field]:
            problems.append(f"{name} ({existing.get(field)!r} there, {planned[field]!r} now)")
    if (existing.get("vae") or {}).get("weights_sha256") != planned["vae"]["weights_sha256"]:
        problems.append("the VAE weights (vae.path)")
    if (existing.get("source") or {}).get("fingerprint") != planned["source"]["fingerprint"]:
        problems.append("the source images or labels (prepare.source_uri)")
    if problems:
        raise ValueError(
            f"prepare.output_uri: '{out}' already holds latents that differ in {'; '.join(problems)}; "
            "choose an empty prepare.output_uri, or delete the old latents to re-encode"
        )


# --- encode: Ray Data stages ---------------------------------------------------------------------


def _fetch_blobs(spec: Dict[str, Any], items: List[List[Any]]) -> List[Optional[bytes]]:
    """Encoded image bytes of each item (None where it cannot be read)."""
    fs, root = storage.filesystem(spec["uri"], spec["storage"])
    if spec["format"] == "imagefolder":
        def read(item):
            try:
                with fs.open_input_stream(posixpath.join(root, item[2])) as stream:
                    return stream.read()
            except OSError:
                return None

        with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
            return list(pool.map(read, items))
    blobs: List[Optional[bytes]] = [None] * len(items)
    by_file: Dict[str, List[int]] = {}
    for position, item in enumerate(items):
        by_file.setdefault(item[2], []).append(position)
    if spec["format"] == "webdataset":
        from speed.data.webdataset import image_member, iter_samples

        for relative, positions in by_file.items():
            wanted = {items[i][0].rsplit("#", 1)[1]: i for i in positions}
            try:
                with fs.open_input_stream(posixpath.join(root, relative)) as stream:
                    for sample in iter_samples(stream):
                        if sample["__key__"] in wanted:
                            blobs[wanted.pop(sample["__key__"])] = image_member(sample)[1]
                        if not wanted:
                            break
            except (OSError, EOFError, tarfile.TarError):
                pass  # the samples not reached stay None and are reported as bad
        return blobs
    for relative, positions in by_file.items():
        rows = [items[i][3] for i in positions]
        first, last = min(rows), max(rows)
        try:
            with fs.open_input_file(posixpath.join(root, relative)) as handle:
                parquet = pq.ParquetFile(handle)
                # Read only the row groups that hold rows [first, last].
                groups, start = [], 0
                for g in range(parquet.num_row_groups):
                    count = parquet.metadata.row_group(g).num_rows
                    if start + count > first and start <= last:
                        groups.append((g, start))
                    start += count
                if not groups:
                    continue  # the rows are past the file's end: the file changed since planning
                table = parquet.read_row_groups([g for g, _ in groups], columns=[spec["image_column"]])
        except OSError:
            continue  # unreadable file: its items stay None and are reported as bad
        column = table.column(0).combine_chunks()
        column = column.field("bytes") if pa.types.is_struct(column.type) else column
        offset = groups[0][1]
        for position, row in zip(positions, rows):
            if 0 <= row - offset < len(column):
                blobs[position] = column[row - offset].as_py()
    return blobs


def _fetch_and_crop(batch: Dict[str, np.ndarray], *, spec: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """One chunk of source items -> uint8 crops; unreadable items come back with ok=False."""
    items = [item for chunk in batch["items"] for item in json.loads(chunk)]
    blobs = _fetch_blobs(spec, items)
    resolution = spec["resolution"]
    images = np.zeros((len(items), resolution, resolution, 3), dtype=np.uint8)
    ok = np.zeros(len(items), dtype=bool)
    errors = [""] * len(items)
    for i, (item, blob) in enumerate(zip(items, blobs)):
        source = storage.join(spec["uri"], item[0])
        try:
            if item[1] < 0:
                raise ValueError("missing label")
            if blob is None:
                raise ValueError("cannot read the file or row")
            images[i] = load_and_crop(blob, resolution, 3)
            ok[i] = True
        except Exception as exc:  # corrupt image data takes many exception types
            if spec["on_error"] == "raise":
                raise BadInputError(
                    f"data.on_error=raise: cannot use '{source}' ({type(exc).__name__}: {exc}); fix or remove it, "
                    "or set data.on_error=skip"
                ) from None
            errors[i] = f"{source}: {type(exc).__name__}: {exc}"
    return {
        "index": np.asarray([item[4] for item in items], dtype=np.int64),
        "shard": np.asarray([item[5] for item in items], dtype=np.int64),
        "key": np.asarray([item[0] for item in items], dtype=object),
        "label": np.asarray([item[1] for item in items], dtype=np.int64),
        "ok": ok,
        "error": np.asarray(errors, dtype=object),
        "image": images,
        **({"clean": _clean_images(images, ok, spec["keep_images"])} if spec.get("keep_images") else {}),
    }


def _clean_images(crops: np.ndarray, ok: np.ndarray, images: Dict[str, Any]) -> np.ndarray:
    """uint8 crops [N, R, R, 3] -> the encoded clean images to store (b"" where not ok)."""
    from PIL import Image

    resolution, fmt = int(images["resolution"]), images["format"]
    out = np.empty(len(crops), dtype=object)
    for i, crop in enumerate(crops):
        if not ok[i]:
            out[i] = b""
            continue
        if crop.shape[0] != resolution:  # a smaller copy: PIL's bicubic resize filters (antialiased)
            crop = np.asarray(Image.fromarray(crop).resize((resolution, resolution), resample=Image.BICUBIC))
        out[i] = encode_image(crop, "JPEG" if fmt == "jpeg" else "PNG")
    return out


class VAEEncoder:
    """A Ray Data actor: loads the VAE once, encodes each image and its mirror image."""

    def __init__(self, vae_path: str, storage_cfg: StorageConfig, dtype: str, scale_factor: float, use_gpu: bool):
        import torch

        from speed.data.vae import load_vae

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.vae = load_vae(vae_path, storage_cfg, dtype=dtype, device=device, scale_factor=scale_factor)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import torch

        ok = batch["ok"].astype(bool)
        size = batch["image"].shape[1] // self.vae.downsample
        shape = (len(ok), len(ORIENTATIONS), self.vae.latent_channels, size, size)
        means, stds = np.zeros(shape, dtype=np.float16), np.zeros(shape, dtype=np.float16)
        if ok.any():
            images = to_model_tensor(batch["image"][ok])
            mean, std = self.vae.encode(torch.cat([images, images.flip(-1)]))  # [2n, C, h, w]: images, then mirrors
            n = int(ok.sum())
            means[ok] = torch.stack([mean[:n], mean[n:]], dim=1).half().cpu().numpy()
            stds[ok] = torch.stack([std[:n], std[n:]], dim=1).half().cpu().numpy()
        out = {key: batch[key] for key in ("index", "shard", "key", "label", "ok", "error", "clean") if key in batch}
        out.update(latent_mean=means, latent_std=stds)
        return out


# --- encode: the job -----------------------------------------------------------------------------


def _shard_rows(out: str, names: Sequence[str], storage_cfg: StorageConfig) -> int:
    fs, root = storage.filesystem(out, storage_cfg)

    def rows(name: str) -> int:
        with fs.open_input_file(posixpath.join(root, name)) as handle:
            return pq.ParquetFile(handle).metadata.num_rows

    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        return int(sum(pool.map(rows, names)))


def _stored_images(p) -> Optional[Dict[str, Any]]:
    """_meta.json's "images" entry: what prepare.keep_images stores beside each latent, or None."""
    if not p.keep_images:
        return None
    resolution = p.image_resolution or p.resolution
    if resolution > p.resolution:
        raise ConfigError(f"prepare.image_resolution={resolution} is above prepare.resolution={p.resolution}; the "
                          "stored image is the center crop, at most that size (REPA's encoder resizes it anyway)")
    return {"format": p.image_format, "resolution": int(resolution), "channels": 3, "orientation": "original"}


def prepare_encode(cfg: Config) -> Dict[str, Any]:
    import ray

    from speed.data.vae import vae_identity

    p = cfg.prepare
    source_data = _source_data_config(cfg)
    out = _require(p.output_uri, "prepare.output_uri", "s3://my-bucket/imagenet256-latents")
    if p.resolution % VAE_DOWNSAMPLE:
        raise ConfigError(f"prepare.resolution={p.resolution} must be a multiple of {VAE_DOWNSAMPLE} (the VAE's downsampling)")
    # Everything that can fail without the cluster fails here, first.
    storage.preflight(source_data.uri, cfg.storage, key="prepare.source_uri", nonempty=True)
    storage.preflight(out, cfg.storage, key="prepare.output_uri", must_exist=False, writable=True)
    identity = vae_identity(_require(cfg.vae.path, "vae.path", "s3://my-bucket/weights/sd-vae-ft-ema"), cfg.storage)
    vae_config = identity["config"]
    downsample = 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)
    if downsample != VAE_DOWNSAMPLE:
        raise ValueError(
            f"vae.path: '{cfg.vae.path}' downsamples by {downsample}, but the latents format expects {VAE_DOWNSAMPLE} "
            "(an SD-style AutoencoderKL with 4 blocks)"
        )
    catalog = scan_dataset(source_data, cfg.storage)
    items = _source_items(catalog)
    num_shards = max(1, math.ceil(len(items) / p.rows_per_shard))
    latent_size = p.resolution // VAE_DOWNSAMPLE
    images = _stored_images(p)
    valid_labels = [label for _, label, _, _ in items if label >= 0]
    planned = {
        "format": LATENT_FORMAT,
        "version": LATENT_FORMAT_VERSION,
        "latent_shape": [int(vae_config.get("latent_channels", 4)), latent_size, latent_size],
        "dtype": "float16",
        "orientations": list(ORIENTATIONS),
        "resolution": p.resolution,
        "downsample": VAE_DOWNSAMPLE,
        "vae": identity,
        "vae_dtype": cfg.vae.dtype,
        "scale_factor": cfg.vae.scale_factor,
        "class_index": catalog.class_to_label,
        "max_label": max(valid_labels, default=-1),
        "num_classes_found": len(set(valid_labels)),
        "source": {"uri": source_data.uri, "format": source_data.format, "items": len(items),
                   "fingerprint": _fingerprint(items)},
        "rows_per_shard": p.rows_per_shard,
        "num_shards": num_shards,
        "images": images,
        "complete": False,
    }
    meta_uri = storage.join(out, LATENT_META_NAME)
    existing = read_latent_meta(out, cfg.storage)
    if existing is not None:
        _check_resume(existing, planned, out)
    else:
        storage.write_text(meta_uri, json.dumps(planned, indent=1), cfg.storage)

    present = {posixpath.basename(uri) for uri in storage.list_files(out, cfg.storage)}
    shard_items = {
        shard: [(*items[i], i, shard) for i in range(shard * p.rows_per_shard, min(len(items), (shard + 1) * p.rows_per_shard))]
        for shard in range(num_shards)
        if shard_name(shard, num_shards) not in present
    }
    skipped = len(items) - sum(len(group) for group in shard_items.values())
    print(f"encode: {len(items)} source images in {num_shards} shards; {len(shard_items)} to write, "
          f"{num_shards - len(shard_items)} already complete", file=sys.stderr, flush=True)

    bad_count, encoded = 0, 0
    if shard_items:
        init_ray(cfg)
        chunks = []
        for shard, group in shard_items.items():
            for start in range(0, len(group), FETCH_CHUNK):
                chunks.append({"items": json.dumps(group[start : start + FETCH_CHUNK])})
        spec = {
            "uri": catalog.uri, "format": source_data.format, "storage": cfg.storage,
            "resolution": p.resolution, "on_error": source_data.on_error, "image_column": source_data.image_column,
            "keep_images": images,
        }
        use_gpu = p.num_gpus_per_actor > 0
        encoder_resources = {"num_gpus": p.num_gpus_per_actor} if use_gpu else {"num_cpus": 1}
        dataset = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
            _fetch_and_crop, fn_kwargs={"spec": spec}, batch_size=1, num_cpus=cfg.data.read_cpus,
        ).map_batches(
            VAEEncoder,
            fn_constructor_kwargs={"vae_path": cfg.vae.path, "storage_cfg": cfg.storage, "dtype": cfg.vae.dtype,
                                   "scale_factor": cfg.vae.scale_factor, "use_gpu": use_gpu},
            batch_size=p.batch_size,
            compute=ray.data.ActorPoolStrategy(size=p.num_actors),
            **encoder_resources,
        )
        pending: Dict[int, List[Dict[str, np.ndarray]]] = {shard: [] for shard in shard_items}
        received = {shard: 0 for shard in shard_items}
        with _progress(len(items) - skipped, "img", "encode") as bar:
            for batch in _batches_or_data_error(dataset):
                for error in batch["error"][~batch["ok"].astype(bool)]:
                    bad_count += 1
                    if bad_count <= cfg.data.max_logged_errors:
                        log.warning("skipping bad input %s (data.on_error=skip)", error)
                for shard in np.unique(batch["shard"]).tolist():
                    rows = batch["shard"] == shard
                    pending[shard].append({key: value[rows] for key, value in batch.items()})
                    received[shard] += int(rows.sum())
                    if received[shard] == len(shard_items[shard]):
                        encoded += _write_shard(out, shard, num_shards, pending.pop(shard), cfg.storage)
                bar.update(len(batch["shard"]))
        if pending:
            raise RuntimeError(f"encode: shards {sorted(pending)} did not receive all their images; rerun to resume")
        if bad_count > cfg.data.max_logged_errors:
            log.warning("%d bad inputs skipped in total", bad_count)

    names = [shard_name(i, num_shards) for i in range(num_shards)]
    total = _shard_rows(out, names, cfg.storage)
    final = dict(existing or planned)
    final.update(complete=True, num_images=total, bad_inputs=len(items) - total)
    storage.write_text(meta_uri, json.dumps(final, indent=1), cfg.storage)
    return {"uri": out, "format": "latents", "images": total, "skipped": skipped, "encoded": encoded,
            "bad": bad_count, "shards": num_shards}


def _batches_or_data_error(dataset):
    """The dataset's batches; a failure caused by the data re-raises as its one-line ValueError."""
    from ray_jobs.data import data_error

    try:
        yield from dataset.iter_batches(batch_size=None, batch_format="numpy")
    except Exception as exc:
        cause = data_error(exc)
        if cause is None:
            raise
        raise cause from None


def _write_shard(out: str, shard: int, num_shards: int, parts: List[Dict[str, np.ndarray]], storage_cfg: StorageConfig) -> int:
    merged = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    order = np.argsort(merged["index"], kind="stable")
    keep = order[merged["ok"][order].astype(bool)]
    table = latent_shard_table(
        [str(k) for k in merged["key"][keep]], merged["label"][keep], merged["latent_mean"][keep], merged["latent_std"][keep],
        images=list(merged["clean"][keep]) if "clean" in merged else None,
    )
    # One whole-object write: readers and reruns never see half a shard.
    storage.write_bytes(storage.join(out, shard_name(shard, num_shards)), table_to_parquet_bytes(table), storage_cfg)
    return int(len(keep))


# --- convert: one format into another, image bytes unchanged ----------------------------------------


def _image_extension(blob: bytes) -> str:
    if blob[:3] == b"\xff\xd8\xff":
        return "jpg"
    if blob[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if blob[:4] == b"RIFF" and blob[8:12] == b"WEBP":
        return "webp"
    return "jpg"


def _output_name(item: Tuple[str, int, str, int], label: int, index: int, wnids: Dict[int, str], source_format: str) -> str:
    """A sample's name in the output: the source's own (an imagefolder file's stem, a WebDataset
    sample key), else wnid_index for Parquet rows."""
    if item[3] < 0:  # an imagefolder file: wnid/name.JPEG
        return posixpath.splitext(item[0].split("/", 1)[1])[0]
    if source_format == "webdataset":
        return posixpath.basename(item[0].rsplit("#", 1)[1])
    return f"{wnids[label]}_{index:08d}"


def _convert_shard(batch: Dict[str, np.ndarray], *, spec: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Read one output shard's source items and write it whole (one atomic write per object)."""
    job = json.loads(batch["job"][0])
    items = [tuple(item) for item in job["items"]]
    blobs = _fetch_blobs(spec, [list(item) for item in items])
    out, fmt, storage_cfg = spec["output_uri"], spec["output_format"], spec["storage"]
    wnids = {int(k): v for k, v in spec["wnids"].items()}
    kept, errors = [], []
    for item, index, blob in zip(items, job["indices"], blobs):
        source = storage.join(spec["uri"], item[0])
        problem = "missing label" if item[1] < 0 else ("cannot read the file or sample" if not blob else None)
        if problem is None:
            try:  # a corrupt image is not copied on: decoding at 1/4 scale makes the check cheap
                open_image(blob, 3, draft_size=64)
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
        if problem:
            if spec["on_error"] == "raise":
                raise BadInputError(f"data.on_error=raise: cannot use '{source}' ({problem}); fix or remove it, "
                                    "or set data.on_error=skip")
            errors.append(f"{source}: {problem}")
            continue
        kept.append((item, index, blob))
    if fmt == "imagefolder":
        def put(entry):
            item, index, blob = entry
            name = _output_name(item, item[1], index, wnids, spec['format'])
            extension = "JPEG" if _image_extension(blob) == "jpg" else _image_extension(blob)
            storage.write_bytes(storage.join(out, wnids[item[1]], f"{name}.{extension}"), blob, storage_cfg)

        with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
            list(pool.map(put, kept))
    elif fmt == "parquet":
        names = [f"{_output_name(item, item[1], index, wnids, spec['format'])}.{_image_extension(blob)}" for item, index, blob in kept]
        image = pa.StructArray.from_arrays(
            [pa.array([blob for _, _, blob in kept], pa.binary()), pa.array(names, pa.string())], names=["bytes", "path"])
        table = pa.table({"image": image, "label": pa.array([item[1] for item, _, _ in kept], pa.int64())})
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=256)
        storage.write_bytes(storage.join(out, job["name"]), buffer.getvalue(), storage_cfg)
    else:
        from speed.data.webdataset import sample_members, tar_bytes

        members = []
        for item, index, blob in kept:
            key = _output_name(item, item[1], index, wnids, spec['format'])
            members += sample_members(key, blob, item[1], _image_extension(blob), {"wnid": wnids[item[1]]})
        storage.write_bytes(storage.join(out, job["name"]), tar_bytes(members), storage_cfg)
    return {"written": np.asarray([len(kept)], dtype=np.int64), "errors": np.asarray([json.dumps(errors)], dtype=object)}


def _convert_jobs(items, output_format: str, rows_per_shard: int, out: str, storage_cfg, wnids, source_format: str) -> Tuple[List[Dict[str, Any]], int]:
    """The output shards still to write (resume: those that exist are skipped) and the images in
    the skipped ones. imagefolder output is planned in groups of files, each file skipped alone."""
    present = {posixpath.relpath(uri, out) if not storage.is_s3(out) else uri[len(out.rstrip("/")) + 1 :]
               for uri in storage.list_files(out, storage_cfg)}
    count = max(1, math.ceil(len(items) / rows_per_shard))
    jobs, skipped = [], 0
    for shard in range(count):
        indices = list(range(shard * rows_per_shard, min(len(items), (shard + 1) * rows_per_shard)))
        if output_format == "imagefolder":
            todo = []
            for i in indices:
                item = items[i]
                stem = _output_name(item, item[1], i, wnids, source_format) if item[1] >= 0 else None
                if stem is not None and any(f"{wnids[item[1]]}/{stem}.{ext}" in present for ext in ("JPEG", "png", "webp")):
                    skipped += 1
                else:
                    todo.append(i)
            name = None
        else:
            name = (f"part-{shard:05d}-of-{count:05d}.parquet" if output_format == "parquet"
                    else f"train-{shard:06d}.tar")
            if name in present:
                skipped += len(indices)
                continue
            todo = indices
        if todo:
            jobs.append({"name": name, "indices": todo, "items": [list(items[i]) for i in todo]})
    return jobs, skipped


def prepare_convert(cfg: Config) -> Dict[str, Any]:
    """prepare.source_uri (prepare.source_format) -> prepare.output_uri (prepare.format), resumable."""
    import ray

    p = cfg.prepare
    source = _source_data_config(cfg)
    out = _require(p.output_uri, "prepare.output_uri", "s3://my-bucket/imagenet-wds")
    if source.uri.rstrip("/") == out.rstrip("/"):
        raise ConfigError("prepare.output_uri must differ from prepare.source_uri")
    from speed.data.catalog import pattern_base

    storage.preflight(pattern_base(source.uri), cfg.storage, key="prepare.source_uri", nonempty=True)
    storage.preflight(out, cfg.storage, key="prepare.output_uri", must_exist=False, writable=True)
    catalog = scan_dataset(source, cfg.storage)
    items = _source_items(catalog)
    labels = sorted({label for _, label, _, _ in items if label >= 0})
    by_label = {label: wnid for wnid, label in catalog.class_to_label.items()}
    wnids = {label: by_label.get(label, digits_wnid(label)) for label in labels}
    jobs, skipped = _convert_jobs(items, p.format, p.rows_per_shard, out, cfg.storage, wnids, source.format)
    print(f"convert: {len(items)} images from {source.format} to {p.format}; {len(jobs)} shard(s) to write, "
          f"{skipped} images already written", file=sys.stderr, flush=True)
    written, bad = 0, 0
    if jobs:
        init_ray(cfg)
        spec = {"uri": catalog.uri, "format": source.format, "storage": cfg.storage, "image_column": source.image_column,
                "on_error": source.on_error, "output_uri": out, "output_format": p.format,
                "wnids": {str(k): v for k, v in wnids.items()}}
        dataset = ray.data.from_items([{"job": json.dumps(job)} for job in jobs], override_num_blocks=len(jobs)).map_batches(
            _convert_shard, fn_kwargs={"spec": spec}, batch_size=1, num_cpus=cfg.data.read_cpus)
        with _progress(sum(len(job["indices"]) for job in jobs), "img", "convert") as bar:
            for batch in _batches_or_data_error(dataset):
                written += int(batch["written"].sum())
                for errors in batch["errors"]:
                    for error in json.loads(errors):
                        bad += 1
                        if bad <= cfg.data.max_logged_errors:
                            log.warning("skipping bad input %s (data.on_error=skip)", error)
                bar.update(int(batch["written"].sum()))
    if p.format == "imagefolder":
        index_uri = storage.join(out, CLASS_INDEX_NAME)
        storage.write_text(index_uri, json.dumps({w: label for label, w in wnids.items()}, indent=1, sort_keys=True),
                           cfg.storage)
    return {"uri": out, "format": p.format, "images": written + skipped, "skipped": skipped, "written": written,
            "bad": bad}


# --- entry point ---------------------------------------------------------------------------------


def _main(argv: List[str]) -> None:
    cfg = load_job_config("prepare", argv, default_config=DEFAULT_CONFIG)
    tasks = {"digits": prepare_digits, "convert": prepare_convert, "encode": prepare_encode}
    result = tasks[cfg.prepare.task](cfg)
    emit("prepare_done", task=cfg.prepare.task, **result)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main("prepare", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
