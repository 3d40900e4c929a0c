"""What a dataset at ``data.uri`` holds: its files, images per file, classes and labels.

A scan lists the dataset once on the driver (pyarrow filesystems, so local folders and s3:// work
alike), checks its layout before any cluster work starts, and yields a ``DatasetCatalog`` from
which ``plan_epoch`` derives each epoch's seeded file order. Layout problems (unknown or empty
class folder, label out of range, missing Parquet column, latent shard of the wrong shape) raise
``DataFormatError`` naming the config key, the URI and the fix; unreadable files follow
``data.on_error``.
"""

from __future__ import annotations

import json
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from speed import storage
from speed.config.schema import DataConfig, StorageConfig
from speed.data.latents import (
    LATENT_COLUMNS,
    LATENT_META_NAME,
    check_latent_meta,
    expected_shard_names,
)
from speed.seeding import epoch_permutation

log = logging.getLogger("speed.data")

PREPARE_HINT = "python -m ray_jobs.prepare -c configs/prepare/digits.yaml"
ENCODE_HINT = "python -m ray_jobs.prepare -c configs/prepare/encode_imagenet.yaml"
# Parallel footer reads: object stores answer many small requests in parallel far faster than in turn.
_METADATA_THREADS = 16


class DataFormatError(ValueError):
    """A dataset whose layout or contents cannot be trained on; the message says what to fix."""


@dataclass
class DatasetCatalog:
    format: str  # imagefolder | parquet | latents
    uri: str  # the dataset root, as configured
    root: str  # the root as a path inside ``filesystem`` (what Ray Data readers take)
    files: List[str]  # paths relative to the root, '/'-separated, sorted
    rows: List[int]  # images per file, aligned with ``files``
    class_to_label: Dict[str, int] = field(default_factory=dict)  # wnid -> label (imagefolder, latents)
    num_classes_found: int = 0  # distinct labels present in the data
    bad_files: List[Tuple[str, str]] = field(default_factory=list)  # (uri, reason) dropped by the scan
    file_labels: Optional[List[np.ndarray]] = None  # parquet: the label column of each file
    latent_meta: Optional[Dict[str, Any]] = None  # latents: the contents of _meta.json

    @property
    def num_images(self) -> int:
        return int(sum(self.rows))

    def file_uri(self, relative: str) -> str:
        return storage.join(self.uri, relative)

    def file_path(self, relative: str) -> str:
        return posixpath.join(self.root, relative)


def _hidden(relative: str) -> bool:
    # Ray Data's listings skip names starting with '.' or '_' too; both sides must agree.
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def _list_entries(uri: str, storage_cfg: Optional[StorageConfig]) -> Tuple[pafs.FileSystem, str, List[Tuple[str, pafs.FileInfo]]]:
    fs, root = storage.filesystem(uri, storage_cfg)
    root = root.rstrip("/")
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise storage.StorageError(f"data.uri: '{uri}' does not exist; write the dataset there first ({PREPARE_HINT})")
    if info.type == pafs.FileType.File:
        raise DataFormatError(f"data.uri: '{uri}' is a file; give the dataset's folder or prefix")
    entries = []
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        relative = entry.path[len(root) :].lstrip("/")
        if relative and not _hidden(relative):
            entries.append((relative, entry))
    return fs, root, entries


def _examples(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(f"'{item}'" for item in list(items)[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# --- class index ---------------------------------------------------------------------------------


def parse_class_index(data: Any, source: str) -> Dict[str, int]:
    """{wnid: label} from JSON: either {wnid: int} or Keras' ImageNet form {"0": [wnid, name], ...}."""
    if not isinstance(data, dict) or not data:
        raise DataFormatError(f"data.class_index_uri: '{source}' must hold a non-empty JSON object {{wnid: label}}")
    mapping: Dict[str, int] = {}
    for key, value in data.items():
        if isinstance(value, bool):
            raise DataFormatError(f"data.class_index_uri: '{source}' maps '{key}' to {value!r}; labels are integers")
        if isinstance(value, int):
            mapping[str(key)] = value
        elif isinstance(value, list) and value and isinstance(value[0], str) and str(key).isdigit():
            mapping[value[0]] = int(key)
        else:
            raise DataFormatError(
                f"data.class_index_uri: '{source}' maps '{key}' to {value!r}; expected {{wnid: label}} "
                'or {"label": [wnid, name]}'
            )
    by_label: Dict[int, str] = {}
    for wnid, label in mapping.items():
        if label < 0:
            raise DataFormatError(f"data.class_index_uri: '{source}' gives '{wnid}' the negative label {label}")
        if label in by_label:
            raise DataFormatError(
                f"data.class_index_uri: '{source}' maps both '{by_label[label]}' and '{wnid}' to label {label}; "
                "each class needs its own label"
            )
        by_label[label] = wnid
    return mapping


def load_class_index(uri: str, storage_cfg: Optional[StorageConfig] = None) -> Dict[str, int]:
    try:
        text = storage.read_text(uri, storage_cfg)
    except storage.StorageError:
        raise storage.StorageError(
            f"data.class_index_uri: '{uri}' does not exist; fix the path or unset it to number the class "
            "folders in sorted order"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"data.class_index_uri: '{uri}' is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return parse_class_index(data, uri)


def _check_label_range(max_label: int, num_classes: Optional[int], where: str) -> None:
    if num_classes is not None and max_label >= num_classes:
        raise DataFormatError(
            f"{where} has label {max_label}, outside [0, model.num_classes={num_classes}); raise "
            "model.num_classes or fix the labels"
        )


# --- imagefolder ---------------------------------------------------------------------------------


def scan_imagefolder(data: DataConfig, storage_cfg: Optional[StorageConfig] = None, num_classes: Optional[int] = None) -> DatasetCatalog:
    """``<uri>/<wnid>/<image>``: one class per folder; files at the root (e.g. a class index) are ignored."""
    fs, root, entries = _list_entries(data.uri, storage_cfg)
    class_folders = set()
    files_by_class: Dict[str, List[str]] = {}
    too_deep: List[str] = []
    for relative, entry in entries:
        parts = relative.split("/")
        if entry.type == pafs.FileType.Directory:
            if len(parts) == 1:
                class_folders.add(parts[0])
            else:
                too_deep.append(relative + "/")
        elif entry.type == pafs.FileType.File:
            if len(parts) == 2:
                class_folders.add(parts[0])
                files_by_class.setdefault(parts[0], []).append(relative)
            elif len(parts) > 2:
                too_deep.append(relative)
    if too_deep:
        raise DataFormatError(
            f"data.uri: '{data.uri}' has entries nested below the class folders ({_examples(sorted(too_deep))}); "
            "imagefolder expects <uri>/<wnid>/<name>.JPEG"
        )
    if not class_folders:
        raise DataFormatError(
            f"data.uri: '{data.uri}' has no class folders; imagefolder expects <uri>/<wnid>/<name>.JPEG "
            f"(write one with {PREPARE_HINT})"
        )
    empty = sorted(class_folders - set(files_by_class))
    if empty:
        raise DataFormatError(
            f"data.uri: class folder(s) {_examples(empty)} under '{data.uri}' are empty; add their images or remove them"
        )
    if data.class_index_uri:
        class_to_label = load_class_index(data.class_index_uri, storage_cfg)
        unknown = sorted(class_folders - set(class_to_label))
        if unknown:
            raise DataFormatError(
                f"data.uri: class folder(s) {_examples(unknown)} under '{data.uri}' are not in data.class_index_uri "
                f"'{data.class_index_uri}'; add them to the index or remove the folders"
            )
    else:
        class_to_label = {wnid: label for label, wnid in enumerate(sorted(class_folders))}
    used = {wnid: class_to_label[wnid] for wnid in class_folders}
    worst = max(used, key=used.get)
    _check_label_range(used[worst], num_classes, f"data.uri: class folder '{worst}' under '{data.uri}'")
    files = sorted(f for group in files_by_class.values() for f in group)
    return DatasetCatalog(
        format="imagefolder",
        uri=data.uri,
        root=root,
        files=files,
        rows=[1] * len(files),
        class_to_label=class_to_label,
        num_classes_found=len(class_folders),
    )


# --- parquet -------------------------------------------------------------------------------------


def image_bytes_column(column: pa.ChunkedArray | pa.Array, name: str = "image") -> pa.Array:
    """The encoded bytes of an image column that is plain binary or a struct {bytes, path}."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        return column.field("bytes")
    return column


def _check_image_type(kind: pa.DataType, uri: str, column: str) -> None:
    binary = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view)
    if any(check(kind) for check in binary):
        return
    if pa.types.is_struct(kind):
        names = [kind.field(i).name for i in range(kind.num_fields)]
        if "bytes" in names and any(check(kind.field("bytes").type) for check in binary):
            return
    raise DataFormatError(
        f"data.image_column: column '{column}' of '{uri}' has type {kind}; expected binary (encoded image "
        "bytes) or a struct {bytes, path}"
    )


def _inspect_parquet(fs: pafs.FileSystem, path: str, uri: str, data: DataConfig) -> Tuple[int, np.ndarray]:
    """(rows, label column) of one Parquet shard after checking its columns."""
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        schema = parquet.schema_arrow
        for key, column in (("data.image_column", data.image_column), ("data.label_column", data.label_column)):
            if column not in schema.names:
                raise DataFormatError(
                    f"{key}: '{uri}' has no column '{column}' (columns: {', '.join(schema.names)}); set {key}"
                )
        _check_image_type(schema.field(data.image_column).type, uri, data.image_column)
        label_type = schema.field(data.label_column).type
        if not pa.types.is_integer(label_type):
            raise DataFormatError(
                f"data.label_column: column '{data.label_column}' of '{uri}' has type {label_type}; labels must be integers"
            )
        labels = parquet.read(columns=[data.label_column]).column(0)
        return parquet.metadata.num_rows, labels.to_numpy(zero_copy_only=False)


def _parquet_files(entries: List[Tuple[str, pafs.FileInfo]]) -> List[str]:
    return sorted(rel for rel, entry in entries if entry.type == pafs.FileType.File and rel.lower().endswith(".parquet"))


def scan_parquet(data: DataConfig, storage_cfg: Optional[StorageConfig] = None, num_classes: Optional[int] = None) -> DatasetCatalog:
    fs, root, entries = _list_entries(data.uri, storage_cfg)
    candidates = _parquet_files(entries)
    if not candidates:
        raise DataFormatError(f"data.uri: no .parquet files under '{data.uri}'; write them first ({PREPARE_HINT} prepare.format=parquet)")

    def inspect(relative: str):
        uri = storage.join(data.uri, relative)
        try:
            return relative, _inspect_parquet(fs, posixpath.join(root, relative), uri, data), None
        except DataFormatError:
            raise
        except Exception as exc:  # a corrupt footer or truncated file: data.on_error decides
            return relative, None, f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=_METADATA_THREADS) as pool:
        results = list(pool.map(inspect, candidates))
    files, rows, labels, bad = [], [], [], []
    for relative, found, error in results:
        uri = storage.join(data.uri, relative)
        if error is not None:
            if data.on_error == "raise":
                raise DataFormatError(
                    f"data.on_error=raise: cannot read Parquet file '{uri}' ({error}); fix or remove it, "
                    "or set data.on_error=skip"
                )
            log.warning("skipping unreadable Parquet file %s: %s", uri, error)
            bad.append((uri, error))
            continue
        count, file_labels = found
        files.append(relative)
        rows.append(count)
        labels.append(file_labels)
    if not files:
        raise DataFormatError(f"data.uri: none of the Parquet files under '{data.uri}' can be read")
    all_labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    present = all_labels[~np.isnan(all_labels)] if all_labels.dtype.kind == "f" else all_labels  # nulls -> NaN
    if present.size:
        if present.min() < 0:
            raise DataFormatError(
                f"data.label_column: '{data.uri}' has negative label {int(present.min())}; labels must be in [0, model.num_classes)"
            )
        _check_label_range(int(present.max()), num_classes, f"data.label_column: '{data.uri}'")
    return DatasetCatalog(
        format="parquet",
        uri=data.uri,
        root=root,
        files=files,
        rows=rows,
        num_classes_found=int(np.unique(present).size),
        bad_files=bad,
        file_labels=labels,
    )


# --- latents -------------------------------------------------------------------------------------


def read_latent_meta(uri: str, storage_cfg: Optional[StorageConfig] = None) -> Optional[Dict[str, Any]]:
    meta_uri = storage.join(uri, LATENT_META_NAME)
    if not storage.exists(meta_uri, storage_cfg):
        return None
    try:
        return json.loads(storage.read_text(meta_uri, storage_cfg))
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"'{meta_uri}' is not valid JSON ({exc.msg}); rerun {ENCODE_HINT}") from None


def scan_latents(data: DataConfig, storage_cfg: Optional[StorageConfig] = None, num_classes: Optional[int] = None) -> DatasetCatalog:
    fs, root, entries = _list_entries(data.uri, storage_cfg)
    meta = read_latent_meta(data.uri, storage_cfg)
    if meta is None:
        raise DataFormatError(
            f"data.uri: no {LATENT_META_NAME} under '{data.uri}'; latents are written by {ENCODE_HINT}"
        )
    check_latent_meta(meta, data.uri, resolution=data.resolution, channels=data.channels)
    if not meta.get("complete"):
        raise DataFormatError(
            f"data.uri: the latents under '{data.uri}' are incomplete (the encode job has not finished); "
            f"rerun {ENCODE_HINT} with prepare.output_uri={data.uri} (it resumes)"
        )
    expected = expected_shard_names(int(meta["num_shards"]))
    present = set(_parquet_files(entries))
    missing = [name for name in expected if name not in present]
    if missing:
        raise DataFormatError(
            f"data.uri: latent shard(s) {_examples(missing)} under '{data.uri}' are missing; rerun {ENCODE_HINT} "
            f"with prepare.output_uri={data.uri} to rewrite them"
        )

    def inspect(relative: str) -> int:
        uri = storage.join(data.uri, relative)
        with fs.open_input_file(posixpath.join(root, relative)) as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            lacking = [column for column in LATENT_COLUMNS if column not in names]
            if lacking:
                raise DataFormatError(
                    f"latent shard '{uri}' lacks column(s) {', '.join(lacking)}; it was not written by the encode "
                    f"job: delete it and rerun {ENCODE_HINT}"
                )
            return parquet.metadata.num_rows

    with ThreadPoolExecutor(max_workers=_METADATA_THREADS) as pool:
        rows = list(pool.map(inspect, expected))
    class_to_label = {str(k): int(v) for k, v in (meta.get("class_index") or {}).items()}
    max_label = int(meta.get("max_label", -1))
    if max_label >= 0:
        _check_label_range(max_label, num_classes, f"data.uri: the latents under '{data.uri}'")
    return DatasetCatalog(
        format="latents",
        uri=data.uri,
        root=root,
        files=list(expected),
        rows=rows,
        class_to_label=class_to_label,
        num_classes_found=int(meta.get("num_classes_found", max_label + 1)),
        latent_meta=meta,
    )


def scan_dataset(data: DataConfig, storage_cfg: Optional[StorageConfig] = None, num_classes: Optional[int] = None) -> DatasetCatalog:
    """Scan and check the dataset that ``data`` describes (any format but digits)."""
    scanners = {"imagefolder": scan_imagefolder, "parquet": scan_parquet, "latents": scan_latents}
    if data.format not in scanners:
        raise DataFormatError(
            f"data.format={data.format!r} has no files to scan; use one of {', '.join(scanners)} (digits lives in memory)"
        )
    if not data.uri:
        raise DataFormatError(f"data.uri is empty; data.format={data.format} needs a local folder or s3://bucket/prefix")
    return scanners[data.format](data, storage_cfg, num_classes)


# --- epoch plans ---------------------------------------------------------------------------------


@dataclass
class EpochPlan:
    files: List[str]  # relative paths, in this epoch's seeded order, leading consumed files removed
    rows: List[int]
    images_skipped: int  # images in the files removed
    files_skipped: int


def plan_epoch(catalog: DatasetCatalog, seed: int, epoch: int, skip_images: int = 0) -> EpochPlan:
    """The epoch's file order (a seeded permutation of the catalog's files) minus leading files
    whose images are all among the first ``skip_images`` images of the epoch.

    A file that is only partly consumed is read again from its start: resume is at file
    granularity (exact for imagefolder, where a file is one image).
    """
    total = catalog.num_images
    if skip_images < 0 or (total and skip_images >= total):
        raise ValueError(
            f"skip_images={skip_images} must be in [0, {total}) (the images in one epoch of '{catalog.uri}'); "
            "pass the epoch number and the images seen within that epoch"
        )
    order = epoch_permutation(len(catalog.files), seed, epoch).tolist()
    files = [catalog.files[i] for i in order]
    rows = [catalog.rows[i] for i in order]
    skipped_files, skipped_images = 0, 0
    while skipped_files < len(files) and skipped_images + rows[skipped_files] <= skip_images:
        skipped_images += rows[skipped_files]
        skipped_files += 1
    return EpochPlan(files[skipped_files:], rows[skipped_files:], skipped_images, skipped_files)
