"""Record-level work per format, as plain functions over batches of records (no Ray).

``ray_jobs.data`` calls these inside Ray Data's ``map_batches``; tests call them directly. Each
takes one batch of a reader's rows and a ``DecodeSpec`` and returns the training columns plus the
bad records it dropped (``speed.data.batches.BadInput``: source and reason), which the caller
counts; under ``on_error="raise"`` the first bad record stops with ``BadInputError`` naming it:

* ``imagefolder_records``: {"file": relative paths} -> fetch each file (threads) and decode;
  a file that vanished since the catalog was built is a bad record like a corrupt one;
* ``parquet_records``: a pyarrow table with the image column (binary or {bytes, path} struct, as
  Hugging Face writes it), the label column and ``path`` (the shard);
* ``webdataset_records``: rows of ``ray.data.read_webdataset(decoder=None)``: ``__key__``,
  ``__url__`` and one column per member extension (raw bytes);
* ``latent_records``: latent shard rows -> one orientation per row (the trainer then draws the
  posterior sample with ``speed.data.latents.sample_latents``).

Rows out: ``image`` float32 [C, R, R] in [-1, 1] and ``label`` int64 (pixels); ``latent_mean`` /
``latent_std`` float16 [C, h, w] and ``label`` (latents), plus ``clean_image`` uint8 [3, r, r]
oriented like the latent when the spec asks for the clean images (REPA on latents).
"""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from speed.data.batches import BadInput, decode_image_batch, decode_latent_batch, reject
from speed.data.catalog import image_bytes_column
from speed.data.latents import LATENT_IMAGE_COLUMN, LatentShapeError, check_latent_images

FETCH_THREADS = 16  # parallel object reads per decode task: object stores reward concurrency


@dataclass(frozen=True)
class DecodeSpec:
    """Everything a decode task needs: plain data, cheap to ship to every task."""

    format: str
    uri: str  # the dataset root as configured (for messages)
    root: str  # the root inside the filesystem
    resolution: int
    channels: int
    random_flip: bool
    seed: int
    epoch: int
    on_error: str = "skip"
    decode: str = "fast"
    num_classes: Optional[int] = None
    class_to_label: Dict[str, int] = field(default_factory=dict)
    image_column: str = "image"
    label_column: str = "label"
    latent_shape: Tuple[int, ...] = ()
    image_resolution: int = 0  # latents: side of the stored clean images to decode (0: none)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def decode_spec(data, catalog, *, num_classes: Optional[int], seed: int, epoch: int,
                clean_images: bool = False) -> DecodeSpec:
    """The spec of one epoch of ``data`` (a DataConfig) over ``catalog`` (a DatasetCatalog).

    ``clean_images``: latents also yield the clean image of each row (REPA; refused with the fix
    when the latents were encoded without images)."""
    if catalog.format != "latents" and data.channels not in (1, 3):
        raise ValueError(f"data.channels={data.channels} is not valid for {catalog.format} images; use 1 or 3")
    latent_shape = tuple(int(v) for v in (catalog.latent_meta or {}).get("latent_shape", ()))
    image_resolution = 0
    if clean_images and catalog.format == "latents":
        image_resolution = int(check_latent_images(catalog.latent_meta, catalog.uri)["resolution"])
    return DecodeSpec(
        format=catalog.format, uri=catalog.uri, root=catalog.root, resolution=int(data.resolution),
        channels=int(data.channels), random_flip=bool(data.random_flip), seed=int(seed), epoch=int(epoch),
        on_error=data.on_error, decode=data.decode, num_classes=num_classes, class_to_label=dict(catalog.class_to_label),
        image_column=data.image_column, label_column=data.label_column, latent_shape=latent_shape,
        image_resolution=image_resolution,
    )


def _join(uri: str, relative: str) -> str:
    return f"{uri.rstrip('/')}/{relative}" if uri.startswith("s3://") else posixpath.join(uri, relative)


def relative_to(path: str, root: str) -> str:
    return path[len(root) :].lstrip("/") if path.startswith(root) else path


def _images(blobs, labels, sources, keys, spec: DecodeSpec):
    return decode_image_batch(
        blobs, labels, sources, keys, resolution=spec.resolution, channels=spec.channels,
        random_flip=spec.random_flip, seed=spec.seed, epoch=spec.epoch, on_error=spec.on_error,
        num_classes=spec.num_classes, decode=spec.decode,
    )


# --- imagefolder ---------------------------------------------------------------------------------


def fetch_files(filesystem, root: str, relatives: Sequence[str], threads: int = FETCH_THREADS) -> List[Any]:
    """The bytes of each file (an exception in its place when it cannot be read)."""
    def read(relative: str):
        try:
            with filesystem.open_input_stream(posixpath.join(root, relative)) as stream:
                return stream.read()
        except Exception as exc:  # missing (removed since the catalog), or unreadable
            return exc

    if len(relatives) <= 1:
        return [read(r) for r in relatives]
    with ThreadPoolExecutor(max_workers=min(threads, len(relatives))) as pool:
        return list(pool.map(read, relatives))


def imagefolder_records(relatives: Sequence[str], blobs: Sequence[Any], spec: DecodeSpec) -> Tuple[Dict[str, np.ndarray], List[BadInput]]:
    """Class-folder files (relative paths, their bytes or the exception reading them) -> rows."""
    labels = [spec.class_to_label[r.split("/", 1)[0]] for r in relatives]
    sources = [_join(spec.uri, r) for r in relatives]
    readable: List[Optional[bytes]] = []
    bad: List[BadInput] = []
    keep = []
    for i, blob in enumerate(blobs):
        if isinstance(blob, BaseException):
            reason = f"{type(blob).__name__}: {blob}"
            if isinstance(blob, FileNotFoundError):
                reason = "the file is gone since the catalog was built (data.catalog=rebuild lists the data again)"
            bad.append(reject(sources[i], reason, spec.on_error))
            continue
        keep.append(i)
        readable.append(blob)
    out, more = _images(readable, [labels[i] for i in keep], [sources[i] for i in keep],
                        [relatives[i] for i in keep], spec)
    return out, bad + more


# --- parquet -------------------------------------------------------------------------------------


def parquet_records(table: pa.Table, spec: DecodeSpec) -> Tuple[Dict[str, np.ndarray], List[BadInput]]:
    """Rows of Parquet shards (today's layout or Hugging Face's) -> training rows."""
    column = table.column(spec.image_column)
    blobs = image_bytes_column(column).to_pylist()
    names = None
    if pa.types.is_struct(column.type) and "path" in [f.name for f in column.type]:
        names = column.combine_chunks().field("path").to_pylist()
    labels = table.column(spec.label_column).to_pylist()
    files = [_join(spec.uri, relative_to(str(p), spec.root)) for p in table.column("path").to_pylist()]
    sources = [
        f"{file} (image '{names[i]}')" if names and names[i] else f"{file} (a row labelled {labels[i]})"
        for i, file in enumerate(files)
    ]
    return _images(blobs, labels, sources, None, spec)


# --- webdataset ----------------------------------------------------------------------------------


def _column(batch, name: str, count: int) -> List[Any]:
    if isinstance(batch, pa.Table):
        return batch.column(name).to_pylist() if name in batch.column_names else [None] * count
    if hasattr(batch, "columns") and not isinstance(batch, dict):  # pandas
        if name not in batch.columns:
            return [None] * count
        return [None if (isinstance(v, float) and np.isnan(v)) else v for v in batch[name].tolist()]
    value = batch.get(name)
    return [None] * count if value is None else list(value)


def webdataset_records(batch, spec: DecodeSpec) -> Tuple[Dict[str, np.ndarray], List[BadInput]]:
    """Samples read by ``read_webdataset(decoder=None)`` (a pandas or pyarrow batch, or a dict of
    columns) -> training rows. A sample with no image member or no label is a bad record named
    by its shard and key."""
    from speed.data.webdataset import IMAGE_EXTENSIONS, image_member, parse_label

    keys = [str(k) for k in _column(batch, "__key__", 0)]
    count = len(keys)
    urls = _column(batch, "__url__", count)
    members = {name: _column(batch, name, count) for name in (*IMAGE_EXTENSIONS, "cls", "json")}
    blobs: List[Optional[bytes]] = []
    labels: List[Optional[int]] = []
    sources: List[str] = []
    flip_keys: List[str] = []
    bad: List[BadInput] = []
    for i, key in enumerate(keys):
        shard = relative_to(str(urls[i]), spec.root) if urls[i] is not None else "?"
        source = f"{_join(spec.uri, shard)} (sample '{key}')"
        sample = {name: values[i] for name, values in members.items()}
        try:
            label = parse_label(sample, spec.label_column)
        except ValueError as exc:
            bad.append(reject(source, str(exc), spec.on_error))
            continue
        if label is None:
            bad.append(reject(source, f"no label: it has no .cls member and no '{spec.label_column}' in its .json",
                               spec.on_error))
            continue
        _, image = image_member(sample)
        if image is None:
            bad.append(reject(source, f"no image member (.{', .'.join(IMAGE_EXTENSIONS)})", spec.on_error))
            continue
        blobs.append(image)
        labels.append(label)
        sources.append(source)
        flip_keys.append(f"{shard}#{key}")
    out, more = _images(blobs, labels, sources, flip_keys, spec)
    return out, bad + more


# --- latents -------------------------------------------------------------------------------------


def latent_records(batch: Dict[str, np.ndarray], spec: DecodeSpec) -> Dict[str, np.ndarray]:
    """Latent shard rows -> one orientation per row (seeded by (seed, epoch, key)), with the clean
    image oriented like its latent when ``spec.image_resolution`` is set."""
    images = None
    if spec.image_resolution:
        if LATENT_IMAGE_COLUMN not in batch:
            raise LatentShapeError(f"the latent shards under '{spec.uri}' have no '{LATENT_IMAGE_COLUMN}' column; "
                                   "re-encode with prepare.keep_images=true")
        images = list(batch[LATENT_IMAGE_COLUMN])
    return decode_latent_batch(
        [str(k) for k in batch["key"]], batch["label"], list(batch["latent_mean"]), list(batch["latent_std"]),
        latent_shape=list(spec.latent_shape), random_flip=spec.random_flip, seed=spec.seed, epoch=spec.epoch,
        num_classes=spec.num_classes, image_blobs=images, image_resolution=spec.image_resolution,
    )
